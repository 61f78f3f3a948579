"""The dashboard in a real browser: Debian's headless chromium (Playwright) against a real
`fleet serve` (`FleetService` with every component, a private Mosquitto) and a swarm of six
real agents (`simulators.live_fleet`, the world `edgefleet demo --serve` runs).

One module-scoped world; the tests are the operator's story in order: a wrong key, logging
in, watching a canary rollout progress, pausing and resuming it, opening the drift heat map
after drift was injected into cohort `eu`, acknowledging an alert, the other pages, and a
viewer who sees no action and gets 403 when posting anyway. Every page is saved as a PNG in
the folder the run prints ("dashboard screenshots: ...", or EDGEFLEET_SCREENSHOT_DIR). No
browser is ever downloaded: a missing /usr/bin/chromium fails the tests (CI must not skip them).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fleet.db.audit import AuditEntry
from simulators.live_fleet import LiveFleet
from tests.support.broker import Broker, start_mosquitto

pytestmark = [pytest.mark.browser, pytest.mark.integration]
CHROMIUM = Path("/usr/bin/chromium")
DEVICES = 6
WAIT_MS = 60_000


@dataclass
class World:
    live: LiveFleet
    broker: Broker
    operator_key: str
    viewer_key: str
    shots: Path
    rollout_id: str = ""
    shot_no: int = 0

    @property
    def base(self) -> str:
        return self.live.fleet.base_url

    def shot(self, page: Page, name: str) -> Path:
        self.shot_no += 1
        path = self.shots / f"{self.shot_no:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def audit(self, action: str) -> list[AuditEntry]:
        return self.live.fleet.service.store.audit.list(None, 100, action=action).items


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dashboard")
    chosen = os.environ.get("EDGEFLEET_SCREENSHOT_DIR")  # pytest keeps only its last three tmp dirs
    shots = Path(chosen) if chosen else tmp_path_factory.mktemp("dashboard-screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\ndashboard screenshots: {shots}", flush=True)  # shown whatever pytest captures
    broker = start_mosquitto(root / "broker")
    live = LiveFleet(root, broker.host, broker.port, DEVICES, prefix="dash", window_s=3.0)
    try:
        live.start()
        live.register("1.0.0", "2.0.0")
        live.provision("1.0.0")
        yield World(live, broker, live.login_key("operator", "alice"), live.login_key("viewer", "victor"),
                    shots)
    finally:
        live.stop()
        broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `bash .ci/setup` (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def login(page: Page, base: str, key: str) -> None:
    page.goto(base + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login"))
    page.fill("#key", key)
    page.click("button[type=submit]")


def test_a_wrong_key_answers_the_login_page_with_a_sentence(world: World, page: Page) -> None:
    login(page, world.base, "efk_not-a-key")
    expect(page.locator("p.error")).to_contain_text("unknown or revoked")
    world.shot(page, "login-refused")
    cookies = {c["name"] for c in page.context.cookies()}
    assert "ef_session" not in cookies


def test_the_operator_logs_in_and_the_overview_counts_refresh_by_themselves(world: World, page: Page) -> None:
    login(page, world.base, world.operator_key)
    expect(page).to_have_url(world.base + "/ui/")
    session = next(c for c in page.context.cookies() if c["name"] == "ef_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["expires"] > 0
    assert session["value"] != world.operator_key and world.operator_key not in session["value"]
    expect(page.locator('[data-count="total"]')).to_have_text(str(DEVICES))
    expect(page.locator('[data-table="by-version"]')).to_contain_text("mlp-1.0.0")
    with page.expect_response(lambda r: "/ui/fragments/counts" in r.url and r.status == 200):
        pass  # htmx polls the counts; the page itself is not reloaded
    expect(page.locator('[data-table="by-cohort"]')).to_contain_text("eu")
    world.shot(page, "overview")


def test_a_rollout_progresses_and_the_operator_pauses_and_resumes_it(world: World, page: Page) -> None:
    world.rollout_id = rid = world.live.canary("2.0.0", [50, 100], bake_s=600)
    page.goto(world.base + "/ui/rollouts")
    page.click(f"a[href='/ui/rollouts/{rid}']")
    progress = page.locator("#progress")
    state = progress.locator('[data-field="state"]')
    expect(state).to_have_text("running")
    expect(progress.locator('[data-status="succeeded"]')).to_have_text(str(DEVICES // 2))  # stage 1: 50 %
    expect(progress.locator('[data-stage-state="current"]')).to_contain_text("stage 1")
    world.shot(page, "rollout-running")

    page.click('[data-action="pause"]')
    expect(page.locator('[data-block="confirm"]')).to_contain_text("Pause rollout")
    world.shot(page, "rollout-confirm-pause")
    page.fill('[data-block="confirm"] input[name="note"]', "looking at the canary")
    page.click('[data-confirm="pause"]')
    expect(page.locator("p.done")).to_contain_text("Pause recorded")
    expect(state).to_have_text("paused")
    world.shot(page, "rollout-paused")

    page.click('[data-action="resume"]')
    page.click('[data-confirm="resume"]')
    expect(page.locator('[data-field="desired"]')).to_have_text("run")
    expect(state).to_have_text("running")
    world.shot(page, "rollout-resumed")
    actors = {(e.action, e.actor) for e in world.audit("rollout.pause") + world.audit("rollout.resume")}
    operator = next(a for _, a in actors)
    assert str(operator).endswith(":alice")
    assert actors == {("rollout.pause", operator), ("rollout.resume", operator)}


def test_the_drift_heat_map_shows_injected_drift_and_an_alert_is_acked(world: World, page: Page) -> None:
    world.live.inject_drift()
    assert world.live.wait_alert(90), "the drift monitor raised no alert after the injected drift"
    page.goto(world.base + "/ui/drift")
    heat = page.locator('[data-block="heatmap"]')
    expect(heat.locator('rect[data-drifted="yes"]').first).to_be_attached()
    cohort = page.locator('input[name="cohort"]').input_value()
    assert cohort == "eu"  # the page opens on the series of the newest open alert
    expect(page.locator('[data-block="histogram"] rect.live').first).to_be_attached()
    world.shot(page, "drift-heatmap")

    row = page.locator("tr[data-alert]", has=page.locator('[data-action="ack"]')).first
    alert_id = row.get_attribute("data-alert")
    row.locator('input[name="note"]').fill("retraining on the new sensor data")
    row.locator('[data-action="ack"]').click()
    expect(page.locator(f'tr[data-alert="{alert_id}"]')).to_contain_text("by key:")
    world.shot(page, "drift-alert-acked")
    acks = world.audit("alert.ack")
    assert [e.resource for e in acks] == [f"alerts/{alert_id}"]
    assert acks[0].actor.endswith(":alice")


def test_devices_models_experiments_and_the_audit_log_link_on(world: World, page: Page) -> None:
    page.goto(world.base + "/ui/devices")
    page.fill('input[name="selector"]', "cohort=eu")
    page.click("form.search button")
    rows = page.locator('[data-table="devices"] tr:has(td a)')
    expect(rows).to_have_count(DEVICES // 2)
    world.shot(page, "devices-eu")
    rows.first.locator("a").first.click()
    expect(page.locator('[data-table="bundles"]')).to_contain_text("mlp-")
    expect(page.locator('[data-block="reported"]')).to_contain_text("active_bundle")
    world.shot(page, "device")
    page.click("footer a.next")  # each page links to the next
    expect(page.locator("h1")).to_have_text("Models")
    world.shot(page, "models")
    page.click("a[href='/ui/models/mlp/versions/2.0.0']")
    expect(page.locator('[data-table="quantization"]')).to_contain_text("int8-dynamic")
    world.shot(page, "model-version")
    page.goto(world.base + "/ui/experiments")
    world.shot(page, "experiments")
    page.goto(world.base + "/ui/audit?action=rollout.pause")
    expect(page.locator("table.audit")).to_contain_text(world.rollout_id)
    world.shot(page, "audit-filtered")


def test_a_viewer_sees_no_action_and_gets_403_when_posting_anyway(world: World, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        login(page, world.base, world.viewer_key)
        page.goto(f"{world.base}/ui/rollouts/{world.rollout_id}")
        expect(page.locator("#progress")).to_contain_text("can watch this rollout")
        assert page.locator("[data-action]").count() == 0
        world.shot(page, "viewer-rollout")
        page.goto(world.base + "/ui/drift")
        assert page.locator('[data-action="ack"]').count() == 0
        csrf = page.locator('input[name="csrf"]').first.input_value()  # the viewer's own, valid token
        before = len(world.audit("rollout.pause")) + len(world.audit("rollout.abort"))
        for path in (f"/ui/rollouts/{world.rollout_id}/pause", f"/ui/rollouts/{world.rollout_id}/abort",
                     "/ui/alerts/1/ack"):
            res = page.request.post(world.base + path, form={"csrf": csrf, "note": "viewer"})
            assert res.status == 403, (path, res.status)
            assert "may not do this" in res.text()
        assert len(world.audit("rollout.pause")) + len(world.audit("rollout.abort")) == before
        page.goto(f"{world.base}/ui/rollouts/{world.rollout_id}/confirm/abort")
        expect(page.locator("p.error")).to_contain_text("needs 'operator'")
        world.shot(page, "viewer-forbidden")
    finally:
        context.close()

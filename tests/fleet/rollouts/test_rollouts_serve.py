"""`edgefleet fleet serve` wiring: the real CLI process with a broker, `publish-bundle`, the
timestamp refresher and the broker URL parsing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.contract.bundle import write_bundle
from agent.contract.protocol import Topics
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.components import broker_config, ensure_trust
from fleet.delivery.timestamp_refresher import TimestampRefresher
from fleet.errors import FleetInputError
from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.models import make_mlp_onnx
from tests.support.broker import Broker, free_port
from tests.support.lifecycle_world import FAST, manifest_for

CLI = [sys.executable, "-m", "agent.cli", "fleet"]


@pytest.mark.unit
def test_broker_urls() -> None:
    cfg = broker_config("mqtts://fleet:s%40cret@broker.local", "fleet-1")
    assert (cfg.host, cfg.port, cfg.tls, cfg.username) == ("broker.local", 8883, True, "fleet")
    assert cfg.password == "s@cret" and "s@cret" not in repr(cfg)
    assert broker_config("mqtt://127.0.0.1:1999", "f").port == 1999
    for bad in ("http://x:1", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(FleetInputError):
            broker_config(bad, "f")


@pytest.mark.integration
def test_timestamp_refresher_resigns_with_a_later_expiry(tmp_path: Path) -> None:
    _, repo = ensure_trust(FleetSettings(data_dir=tmp_path))
    before = repo.load("timestamp").signed
    refresher = TimestampRefresher(repo, interval_s=0.05)
    refresher.start()
    try:
        deadline = time.monotonic() + 10
        while refresher.refreshed < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        refresher.stop()
    after = repo.load("timestamp").signed
    assert refresher.refreshed >= 2 and after.version >= before.version + 2
    assert after.expires >= before.expires and after.snapshot_meta.version == before.snapshot_meta.version


@pytest.mark.integration
def test_fleet_serve_with_a_broker_publishes_the_repository_and_stops_cleanly(
        tmp_path: Path, mosquitto: Broker) -> None:
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(tmp_path / "data"), "EDGEFLEET_TOPIC_PREFIX": "ef-serve"}
    model = make_mlp_onnx(1)
    bundle = write_bundle(manifest_for("1.0.0", model, 1, FAST), model, tmp_path / "mlp-1.0.0.efb")
    out = subprocess.run([*CLI, "publish-bundle", str(bundle)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mlp:1.0.0"
    again = subprocess.run([*CLI, "publish-bundle", str(bundle)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a bundle")
    bad = subprocess.run([*CLI, "publish-bundle", str(junk)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "not a bundle" in bad.stderr

    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--broker", mosquitto.url], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: list[str] = []
    watcher = MqttTransport(MqttConfig(port=mosquitto.port, client_id=f"watch-{os.getpid()}"))
    topics = Topics("ef-serve")
    watcher.subscribe(topics.metadata("timestamp.json"), lambda m: seen.append(m.topic))
    try:
        for _ in range(400):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            proc.kill()
            raise AssertionError(f"fleet serve did not start: {proc.communicate()[0]}")
        watcher.connect(10)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # retained: published by the publisher at start
            time.sleep(0.05)
        assert seen == [topics.metadata("timestamp.json")]
    finally:
        watcher.close()
        proc.terminate()
        code = proc.wait(timeout=30)
    log = proc.stdout.read() if proc.stdout else ""
    assert code == 0, log
    for name in ("publisher", "telemetry-ingest", "rollout-controller", "experiment-driver",
                 "timestamp-refresher"):
        assert f"fleet.component.started component={name}" in log, log[-3000:]
        assert f"fleet.component.stopped component={name}" in log, log[-3000:]
    assert (tmp_path / "data" / "repo" / "metadata" / "1.root.json").is_file()


@pytest.mark.integration
def test_bundle_upload_route_publishes_a_target_and_refuses_junk(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    settings = FleetSettings(data_dir=tmp_path / "data")
    store = Store(settings.db_path)
    key = create_api_key(store, "op", "operator", "t")[1]
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
    model = make_mlp_onnx(2)
    bundle = write_bundle(manifest_for("2.0.0", model, 2, FAST), model, tmp_path / "b.efb")
    try:
        with TestClient(create_app(settings, store)) as c:
            early = c.post("/v1/models/mlp/versions/upload", headers=h, content=bundle.read_bytes())
            assert early.status_code == 422 and "not initialised" in early.json()["detail"][0]["msg"]
            _, repo = ensure_trust(settings)
            ok = c.post("/v1/models/mlp/versions/upload", headers=h, content=bundle.read_bytes())
            assert ok.status_code == 201, ok.text
            assert ok.json()["bundle_target"] == "models/mlp/mlp-2.0.0.efb"
            ref = repo.target_ref("models/mlp/mlp-2.0.0.efb")
            assert (ref.name, ref.version, ref.length) == ("mlp", "2.0.0", bundle.stat().st_size)
            junk = c.post("/v1/models/mlp/versions/upload", headers=h, content=b"junk" * 100)
            assert junk.status_code == 422 and "not valid" in junk.json()["detail"][0]["msg"]
            wrong = c.post("/v1/models/other/versions/upload", headers=h, content=bundle.read_bytes())
            assert wrong.status_code == 422 and "not 'other'" in wrong.json()["detail"][0]["msg"]
            empty = c.post("/v1/models/mlp/versions/upload", headers=h, content=b"")
            assert empty.status_code == 422
            dup = c.post("/v1/models/mlp/versions/upload", headers=h, content=bundle.read_bytes())
            assert dup.status_code == 409
    finally:
        store.close()

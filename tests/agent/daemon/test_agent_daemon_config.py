"""Agent config parsing, the director gate's ledger, the CLI around the daemon, sd_notify."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from securesystemslib.signer import CryptoSigner

from agent.cli.agent_commands import group
from agent.config import EXAMPLE_CONFIG, load_config, parse_config
from agent.contract.director import DirectorDocument, DirectorTrust, TargetRef, sign_director
from agent.contract.windows import UpdateWindows, Window
from agent.daemon.director_gate import DirectorGate
from agent.errors import ConfigError, DirectorError, MisuseError

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2030, 1, 1, tzinfo=UTC)
MINIMAL = {"device_id": "gw-1", "mqtt": {"port": 1883}}


def cfg(**changes: object) -> str:
    return json.dumps({**MINIMAL, **changes})


@pytest.mark.unit
def test_example_config_parses_with_comments_and_defaults() -> None:
    c = parse_config(EXAMPLE_CONFIG)
    assert c.device_id == "gw-0001" and c.mqtt.client_id == "gw-0001"  # client id defaults to device id
    assert c.api.http_host == "127.0.0.1" and c.cohorts == ["eu-west"]
    minimal = parse_config(cfg())
    assert minimal.api.http_enabled and minimal.api.unix_enabled and minimal.limits.chunk_size == 65536


@pytest.mark.unit
def test_comment_lines_only_whole_lines() -> None:
    c = parse_config('// leading comment\n{"device_id": "gw-1",\n  // inside\n "mqtt": {"host": "h//x"}}')
    assert c.mqtt.host == "h//x"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bogus": 1}, "bogus: unknown field"),
        ({"device_id": "a/b"}, "device_id"),
        ({"cohorts": ["ok", "no#"]}, "cohort 'no#'"),
        ({"topic_prefix": "a/+/b"}, "invalid topic prefix"),
        ({"api": {"http_host": "0.0.0.0"}}, "not loopback"),
        ({"limits": {"chunk_size": 128 * 1024}, "mqtt": {"max_message_bytes": 128 * 1024}}, "chunk_size"),
        ({"limits": {"chunk_size": 100}}, "limits.chunk_size"),
        ({"telemetry_interval_s": 0}, "telemetry_interval_s"),
        ({"lifecycle": {"timezone": "Europe/Atlantis"}}, "unknown time zone 'Europe/Atlantis'"),
        ({"lifecycle": {"max_load_per_cpu": 0}}, "lifecycle.max_load_per_cpu"),
        ({"api": {"unix_batch_window_us": -1}}, "api.unix_batch_window_us"),
        ({"api": {"unix_batch_max_rows": 0}}, "api.unix_batch_max_rows"),
        ({"api": {"unix_shm_spin_us": -1}}, "api.unix_shm_spin_us"),
        ({"api": {"unix_shm": "yes"}}, "api.unix_shm"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="<config>") as info:
        parse_config(cfg(**changes))
    assert message in str(info.value)


@pytest.mark.unit
def test_micro_batching_is_off_by_default_and_opt_in() -> None:
    assert parse_config(cfg()).api.unix_batch_window_us is None
    c = parse_config(cfg(api={"unix_batch_window_us": 0, "unix_batch_max_rows": 16}))
    assert (c.api.unix_batch_window_us, c.api.unix_batch_max_rows) == (0, 16)


@pytest.mark.unit
def test_shared_memory_is_on_by_default_and_can_be_turned_off() -> None:
    assert (parse_config(cfg()).api.unix_shm, parse_config(cfg()).api.unix_shm_spin_us) == (True, 300.0)
    c = parse_config(cfg(api={"unix_shm": False, "unix_shm_spin_us": 0}))
    assert (c.api.unix_shm, c.api.unix_shm_spin_us) == (False, 0)


@pytest.mark.unit
def test_non_loopback_http_needs_explicit_opt_in() -> None:
    c = parse_config(cfg(api={"http_host": "0.0.0.0", "allow_remote": True}))
    assert c.api.http_host == "0.0.0.0"


@pytest.mark.integration
def test_load_config_reports_missing_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not JSON"):
        load_config(tmp_path / "bad.json")


# --- director gate ----------------------------------------------------------------------------
SIGNER = CryptoSigner.generate_ed25519()
TRUST = DirectorTrust(keys={SIGNER.public_key.keyid: SIGNER.public_key}, threshold=1)
REF = TargetRef(path="models/m.efb", length=10, sha256="ab" * 32, name="m", version="1.0.0")


def doc(seq: int, device: str | None = "gw-1", cohort: str | None = None, version: str = "1.0.0") -> bytes:
    ref = REF.model_copy(update={"version": version})
    return sign_director(
        DirectorDocument(
            device_id=device,
            cohort=cohort,
            sequence=seq,
            issued_at=NOW - timedelta(hours=1),
            expires=NOW + timedelta(days=1),
            target=ref,
        ),
        [SIGNER],
    )


def gate(path: Path) -> DirectorGate:
    return DirectorGate(path / "director.json", "gw-1", ["lab"], lambda: TRUST, clock=lambda: NOW)


@pytest.mark.integration
def test_gate_numbers_documents_per_addressee_and_refuses_replays(tmp_path: Path) -> None:
    g = gate(tmp_path)
    first = g.accept("device:gw-1", doc(5), 0)
    assert first is not None and first.sequence == 1 and first.bundle_id == "m-1.0.0"
    assert g.accept("device:gw-1", doc(5), 1) is None  # retained copy / QoS 1 duplicate
    with pytest.raises(DirectorError, match="replayed or stale"):
        g.accept("device:gw-1", doc(4, version="0.9.0"), 1)
    # the cohort has its own sequence space: its document 1 is new
    cohort = g.accept("cohort:lab", doc(1, device=None, cohort="lab", version="2.0.0"), 1)
    assert cohort is not None and cohort.sequence == 2 and cohort.version == "2.0.0"
    with pytest.raises(DirectorError, match="arrived on the desired topic of device:gw-1"):
        g.accept("device:gw-1", doc(9, device=None, cohort="lab"), 2)
    with pytest.raises(DirectorError, match="not one of ours"):
        g.accept("cohort:other", doc(9, device=None, cohort="other"), 2)
    assert json.loads((tmp_path / "director.json").read_text())["local"] == 2


@pytest.mark.integration
def test_gate_hands_the_documents_windows_to_the_lifecycle(tmp_path: Path) -> None:
    windows = UpdateWindows(download=Window(cron="0 0 * * *", duration_s=3600), tz="Europe/Berlin")
    signed = sign_director(DirectorDocument(device_id="gw-1", sequence=7, issued_at=NOW - timedelta(hours=1),
                                            expires=NOW + timedelta(days=1), target=REF, windows=windows),
                           [SIGNER])
    target = gate(tmp_path).accept("device:gw-1", signed, 0)
    assert target is not None and target.windows == {"download": {"cron": "0 0 * * *", "duration_s": 3600},
                                                     "tz": "Europe/Berlin"}
    assert target.sequence == 1  # renumbered locally, windows kept


@pytest.mark.integration
def test_gate_survives_restart_and_hands_over_what_the_lifecycle_missed(tmp_path: Path) -> None:
    gate(tmp_path).accept("device:gw-1", doc(3), 0)
    again = gate(tmp_path)  # a new process; the lifecycle never saw the document (record still 0)
    missed = again.accept("device:gw-1", doc(3), 0)
    assert missed is not None and missed.sequence == 1
    assert again.accept("device:gw-1", doc(3), 1) is None
    # a corrupt ledger is logged and replaced; numbering continues above the lifecycle's record
    (tmp_path / "director.json").write_text("{garbage")
    fresh = gate(tmp_path).accept("device:gw-1", doc(4), 7)
    assert fresh is not None and fresh.sequence == 8


@pytest.mark.integration
def test_gate_refuses_bad_signatures_and_expired_documents(tmp_path: Path) -> None:
    g = gate(tmp_path)
    tampered = json.loads(doc(2))
    tampered["signed"]["sequence"] = 3
    with pytest.raises(DirectorError, match="signature"):
        g.accept("device:gw-1", json.dumps(tampered).encode(), 0)
    late = DirectorGate(
        tmp_path / "d2.json", "gw-1", [], lambda: TRUST, clock=lambda: NOW + timedelta(days=2)
    )
    with pytest.raises(DirectorError, match="expired"):
        late.accept("device:gw-1", doc(2), 0)
    assert not (tmp_path / "director.json").exists() and not (tmp_path / "d2.json").exists()


# --- CLI and the process around the daemon ----------------------------------------------------
@pytest.mark.integration
def test_init_config_then_status_on_a_fresh_device(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "agent.json"
    assert runner.invoke(group, ["init-config", str(out)]).exit_code == 0
    assert runner.invoke(group, ["init-config", str(out)]).exit_code != 0  # no silent overwrite
    text = out.read_text().replace('"/var/lib/edgefleet"', json.dumps(str(tmp_path / "state")))
    out.write_text(text, encoding="utf-8")
    res = runner.invoke(group, ["status", "--config", str(out)])
    assert res.exit_code == 0, res.output
    assert "state              idle" in res.output and "active             -" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text(cfg(bogus=1))
    res = runner.invoke(group, ["status", "--config", str(bad)])
    assert res.exit_code == 1 and "bogus" in res.output


@pytest.mark.integration
@pytest.mark.parametrize("batch_window_us", [None, 0.0], ids=["threads", "micro-batching"])
def test_run_without_broker_notifies_systemd_and_stops_on_sigterm(
    tmp_path: Path, batch_window_us: float | None
) -> None:
    from fleet.trust.keys import KeyStore
    from fleet.trust.repository import Repository

    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    short = Path(tempfile.mkdtemp(prefix="efn-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short / "notify"))
    notify.settimeout(30)
    with socket.socket() as s:  # a port nobody listens on: the broker is unreachable
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = tmp_path / "agent.json"
    config.write_text(
        cfg(
            state_dir=str(tmp_path / "state"),
            bootstrap_root=str(repo.metadata_dir / "1.root.json"),
            mqtt={"port": dead_port},
            api={"http_enabled": False, "unix_socket": str(short / "a.sock"),
                 "unix_batch_window_us": batch_window_us},
            report_interval_s=0.1,
        )
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(short / "notify"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen: list[str] = []
        while not ("READY=1" in seen and "WATCHDOG=1" in seen):
            seen.append(notify.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        notify.settimeout(0.5)
        rest: list[str] = []
        with contextlib.suppress(TimeoutError):
            while True:
                rest.append(notify.recv(4096).decode())
        assert "STOPPING=1" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert not (short / "a.sock").exists()  # the socket file is removed on a clean stop


@pytest.mark.integration
def test_event_outbox_keeps_order_across_reopen_and_drops_oldest_past_its_bound(tmp_path: Path) -> None:
    from agent.daemon.events import EventOutbox

    box = EventOutbox(tmp_path / "events.sqlite", max_events=3)
    for i in range(5):
        box.put(f"e{i}".encode())
    box.close()
    box = EventOutbox(tmp_path / "events.sqlite", max_events=3)
    assert len(box) == 3
    sent: list[bytes] = []

    class Acked:  # a broker-acknowledged delivery (see test_agent_event_delivery.py)
        def is_published(self) -> bool:
            return True

    def send_two(payload: bytes) -> Acked | None:
        sent.append(payload)
        return Acked() if len(sent) < 2 else None  # the second send fails

    def send_all(payload: bytes) -> Acked | None:
        sent.append(payload)
        return Acked()

    assert box.drain(send_two) == 1  # stops at the failed send, which stays queued
    assert sent == [b"e2", b"e3"] and len(box) == 3  # e2 leaves at the next drain (acknowledged)
    assert box.drain(send_all) == 2
    assert sent[2:] == [b"e3", b"e4"] and len(box) == 2
    assert box.drain(send_all) == 0 and len(box) == 0
    (tmp_path / "bad.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(MisuseError, match="event outbox"):
        EventOutbox(tmp_path / "bad.sqlite").put(b"x")

"""`edgefleet telemetry ...`: the commands through click's runner in this process (each real
process costs two seconds of imports), and once as a real process (`python -m fleet.cli.telemetry`)
for what only a process shows: its exit code and what reaches stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import latency_bucket, latency_bucket_upper
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.cli.telemetry import group
from fleet.telemetry.ingest import TelemetryStore


def _process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet.cli.telemetry", *args],
                          capture_output=True, text=True, timeout=120)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command run in this process; the same fields as a finished process."""
    got = CliRunner().invoke(group, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(list(args), got.exit_code, got.stdout, got.stderr)


@pytest.mark.integration
def test_profile_windows_drift_and_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x.sum(axis=1))
    made = _cli("profile", str(tmp_path / "x.npy"), "--names", "a,b,c", "--outputs", str(tmp_path / "y.npy"),
                "-o", str(tmp_path / "profile.json"))
    assert made.returncode == 0, made.stderr
    prof = ReferenceProfile.model_validate_json((tmp_path / "profile.json").read_text())
    assert [f.name for f in prof.features] == ["a", "b", "c"] and prof.sample_count == 3000

    store = TelemetryStore(tmp_path / "t.db")
    sk = TelemetrySketch(prof, "dev-1", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    cur = rng.normal(0.7, 1.0, size=(800, 3))
    sk.update(cur, cur.sum(axis=1), 0.003)
    payload = encode_report(sk.snapshot_and_reset())
    assert store.ingest(payload) == "accepted"
    store.close()
    (tmp_path / "report.bin").write_bytes(payload)

    shown = _cli("windows", "--db", str(tmp_path / "t.db"), "--model", "m", "--version", "1.0.0")
    assert shown.returncode == 0, shown.stderr
    p50 = latency_bucket_upper(latency_bucket(0.003)) * 1e3  # the one request's latency bucket
    assert "p95 ms" in shown.stdout and f"{p50:.2f}" in shown.stdout
    verdict = _cli("drift", "--db", str(tmp_path / "t.db"), "--profile", str(tmp_path / "profile.json"),
                   "--model", "m", "--version", "1.0.0", "--json", "--fail-on-drift")
    assert verdict.returncode == 3, verdict.stderr
    doc = json.loads(verdict.stdout)
    assert doc["dataset_drift"] and doc["prediction_drift"] and len(doc["columns"]) == 4
    assert all(c["method"] == "ks_budget" and c["drifted"] for c in doc["columns"])
    table = _cli("drift", "--db", str(tmp_path / "t.db"), "--profile", str(tmp_path / "profile.json"),
                 "--model", "m", "--version", "1.0.0")
    assert table.returncode == 0 and "dataset drift: True" in table.stdout

    decoded = _cli("decode", str(tmp_path / "report.bin"))
    assert decoded.returncode == 0 and json.loads(decoded.stdout)["device_id"] == "dev-1"
    (tmp_path / "bad.bin").write_bytes(b"\x01garbage")
    bad = _process("decode", str(tmp_path / "bad.bin"))  # a real process: one line, exit 1
    assert bad.returncode == 1 and "zstd" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("drift", "--db", str(tmp_path / "t.db"), "--profile", str(tmp_path / "profile.json"),
                   "--model", "m", "--version", "9.9.9")
    assert missing.returncode == 1 and "no telemetry" in missing.stderr
    helped = _process("--help")
    assert helped.returncode == 0 and "drift" in helped.stdout

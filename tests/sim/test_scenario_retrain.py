"""`edgefleet sim run --scenario retrain_loop`: the whole retraining loop with real agents over a
private Mosquitto, the fleet service in-process (about a minute on two cores: marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.slow
def test_the_drifted_cohort_is_retrained_and_recovers_and_the_report_plots_it(tmp_path: Path) -> None:
    out, html = tmp_path / "verdicts.json", tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "sim", "run",
                          "--devices", "6", "--processes", "1", "--scenario", "retrain_loop",
                          "--json", str(out), "--html", str(html)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.exists(), res.stderr[-2000:]
    (verdict,) = json.loads(out.read_text())["scenarios"]
    assert verdict["passed"], verdict["details"]
    m = verdict["metrics"]
    # the unretrained model on the drifted data is the baseline of the same run
    assert m["accuracy_eu_drifted_unretrained"] < m["accuracy_eu_before_drift"]
    assert m["retrain_accuracy_gain"] == pytest.approx(m["accuracy_eu_retrained"]
                                                       - m["accuracy_eu_drifted_unretrained"])
    assert m["retrain_accuracy_gain"] > 0 and m["trigger_to_canary_s"] > 0 and m["datasets"] >= 1
    assert m["gate_new_collected"] > m["gate_parent_collected"]
    series = verdict["series"]["accuracy per cohort (ground truth, per served batch)"]
    assert {"eu", "us", "drift (eu)", "canary start"} <= set(series)
    assert "accuracy per cohort" in html.read_text()
    assert res.returncode == 0, res.stderr[-2000:]

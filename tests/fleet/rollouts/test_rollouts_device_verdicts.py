"""What a device's report, event or silence means for its rollout entry (pure, injected clock)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.contract.protocol import Event
from fleet.rollouts.device_verdicts import DeviceUpdate, event_update, forward_update, revert_verdict
from fleet.rollouts.record_types import DeviceProgress, DeviceReport, OpenEntry, RuntimePhase
from fleet.rollouts.strategies import StrategyConfig

V1, V2 = "mlp-1.0.0", "mlp-2.0.0"
CFG = StrategyConfig.parse({"device_timeout_s": 300, "revert_timeout_s": 100})
ROW = DeviceProgress("ro-1", "d1", "ab", V1, 1000.0, False, None, None, "", "assigned", 0)
ENTRY = OpenEntry("ro-1", "d1", V1, 1000.0, False, None, RuntimePhase.FORWARD, V2)


def _report(state: str, active: str | None, at: float = 1001.0, previous: str | None = None) -> DeviceReport:
    return DeviceReport(state=state, active_bundle=active, previous_bundle=previous, timestamp=at)


@pytest.mark.unit
def test_only_a_commit_succeeds_and_a_late_one_upgrades_a_timeout() -> None:
    assert forward_update(ROW, _report("idle", V2), V2, 1010.0, CFG, 5.0) == DeviceUpdate(
        "succeeded", {"outcome": "succeeded", "detail": "committed"})
    late = forward_update(replace(ROW, outcome="timeout"), _report("idle", V2), V2, 5000.0, CFG, 5.0)
    assert late is not None and late.fields["detail"] == "committed after the timeout"
    assert forward_update(ROW, _report("probation", V2), V2, 1010.0, CFG, 5.0) == DeviceUpdate("probation")
    fetching = forward_update(ROW, _report("downloading", V1), V2, 1010.0, CFG, 5.0)
    assert fetching == DeviceUpdate("downloading")
    # a report older than the document (beyond the clock skew) says nothing about it
    assert forward_update(ROW, _report("staged", V1, at=990.0), V2, 1010.0, CFG, 5.0) is None
    silent = forward_update(ROW, _report("idle", V1), V2, 1301.0, CFG, 5.0)
    assert silent == DeviceUpdate("failed", {"outcome": "timeout",
                                             "detail": "no commit within 300s (last state idle)"})
    assert forward_update(replace(ROW, assigned_at=None), _report("idle", V2), V2, 1010.0, CFG, 5.0) is None


@pytest.mark.unit
def test_a_device_offline_when_assigned_learns_its_previous_bundle_from_a_later_report() -> None:
    row = replace(ROW, from_bundle=None)
    update = forward_update(row, _report("probation", V2, previous=V1), V2, 1010.0, CFG, 5.0)
    assert update == DeviceUpdate("probation", {"from_bundle": V1})


@pytest.mark.unit
def test_events_fail_or_acknowledge_only_their_own_bundle() -> None:
    def ev(kind: str, bundle: str | None = V2, at: float = 1001.0) -> Event:
        return Event(type=kind, bundle_id=bundle, reason="r", timestamp=at, seq=1)

    assert event_update(ENTRY, ev("director_accepted"), 5.0) == DeviceUpdate(fields={"acked": 1})
    assert event_update(ENTRY, ev("rolled_back", "other-1.0.0"), 5.0) is None
    failed = event_update(ENTRY, ev("update_failed"), 5.0)
    assert failed is not None and failed.fields["outcome"] == "install_failed"
    assert event_update(replace(ENTRY, outcome="install_failed"), ev("rolled_back"), 5.0) is None
    assert event_update(replace(ENTRY, outcome="timeout"), ev("committed"), 5.0) is not None
    refused = event_update(ENTRY, ev("director_refused", None), 5.0)
    assert refused is not None and refused.fields["detail"] == "director document refused: r"
    assert event_update(ENTRY, ev("director_refused", None, at=900.0), 5.0) is None  # an older document
    back = replace(ENTRY, phase=RuntimePhase.ROLLBACK)
    assert event_update(back, ev("director_accepted", V1), 5.0) == DeviceUpdate(fields={"acked": 1})
    assert event_update(back, ev("update_failed"), 5.0) is None


@pytest.mark.unit
def test_revert_sends_back_skips_or_fails_each_device() -> None:
    known = {V1, V2}
    send = revert_verdict(ROW, DeviceReport(), V2, known, 2000.0, CFG, 5.0)
    assert send is not None and send.send_to == V1
    assert send.update.fields == {"outcome": "reverting", "revert_at": 2000.0, "acked": 0,
                                  "detail": f"returning to {V1} (in flight)"}
    for row, why in ((replace(ROW, assigned_at=None), "never assigned"),
                     (replace(ROW, from_bundle=None), "no previous bundle to return to"),
                     (replace(ROW, from_bundle=V2), "ran this bundle before the rollout")):
        skip = revert_verdict(row, DeviceReport(), V2, known, 2000.0, CFG, 5.0)
        assert skip is not None and skip.send_to is None
        assert skip.update.fields["detail"] == f"not reverted: {why}"
    gone = revert_verdict(ROW, DeviceReport(), V2, {V2}, 2000.0, CFG, 5.0)
    assert gone is not None and gone.update.fields["outcome"] == "revert_failed"
    reverting = replace(ROW, outcome="reverting", revert_at=2000.0)
    assert revert_verdict(reverting, _report("idle", V1, at=1990.0), V2, known, 2001.0, CFG, 5.0) is None
    home = revert_verdict(reverting, _report("idle", V1, at=2001.0), V2, known, 2002.0, CFG, 5.0)
    assert home is not None and home.update == DeviceUpdate("rolled_back", {"outcome": "reverted",
                                                                            "detail": f"back on {V1}"})
    acked = revert_verdict(replace(reverting, acked=True), _report("idle", V1, at=0.0), V2, known, 2001.0,
                           CFG, 5.0)  # accepted the document: an old-clock report still counts
    assert acked is not None and acked.update.status == "rolled_back"
    late = revert_verdict(reverting, _report("idle", V2), V2, known, 2101.0, CFG, 5.0)
    assert late is not None and late.update.fields["outcome"] == "revert_failed"

"""What the daemon puts into its events: lifecycle reports, shadow reports, protocol bounds."""

from __future__ import annotations

import json

import pytest

from agent.contract.protocol import decode_event
from agent.daemon.events import encode_event_bounded, lifecycle_event, shadow_measurements
from agent.serving.model_holder import ShadowReport


@pytest.mark.unit
def test_a_lifecycle_report_becomes_event_fields() -> None:
    fields = lifecycle_event(
        "staged",
        {
            "bundle": "m-2.0.0",
            "reason": None,
            "sequence": 7,
            "swapped": True,
            "measurements": {"p95": 3, "x": "no"},
        },
        previous_active="m-1.0.0",
    )
    assert fields == {
        "kind": "installed",  # the lifecycle's "staged" is the wire's "installed"
        "bundle_id": "m-2.0.0",
        "previous_bundle_id": "m-1.0.0",
        "reason": "",
        "measurements": {"p95": 3.0, "sequence": 7.0, "swapped": 1.0},  # non-numbers dropped
    }
    named = lifecycle_event("rolled_back", {"bundle": "b", "previous": "a", "reason": "golden"}, "z")
    assert (named["kind"], named["previous_bundle_id"], named["reason"]) == ("rolled_back", "a", "golden")


@pytest.mark.unit
def test_shadow_measurements_keep_only_numbers() -> None:
    rep = ShadowReport(
        bundle_id="cand-1.0.0", offered=10, compared=9, dropped=1, errors=0,
        label_agreement=0.9, mean_abs_diff=None, latency_p50_ms=1.5, latency_p95_ms=None,
    )
    assert shadow_measurements(rep) == {
        "offered": 10.0, "compared": 9.0, "dropped": 1.0, "errors": 0.0,
        "label_agreement": 0.9, "latency_p50_ms": 1.5,
    }


@pytest.mark.unit
def test_a_long_failure_is_cut_to_the_protocol_bounds_not_refused() -> None:
    many = {f"m{i}": float(i) for i in range(100)}
    payload = encode_event_bounded("gw-1", "health_failed", 5, "m-1.0.0", None, "x" * 5000, many)
    event = decode_event(payload, "gw-1")  # the fleet's own decoder accepts it
    assert (event.type, event.seq) == ("health_failed", 5)
    assert (len(event.reason), len(event.measurements)) == (2048, 64)
    assert "previous_bundle_id" not in json.loads(payload)  # no nulls on the wire
    with pytest.raises(ValueError, match="type"):
        encode_event_bounded("gw-1", "Not A Type", 6)

"""The training job lifecycle table and its pure decisions; the policy document's checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.errors import FleetInputError, FleetMisuseError
from fleet.training.interface import parse_progress, read_output
from fleet.training.machine import (
    INITIAL_STATE,
    TERMINAL_STATES,
    TRANSITIONS,
    JobEvent,
    JobSnapshot,
    JobState,
    Work,
    decide,
    render_table,
    transition,
)
from fleet.training.policy import TrainingPolicy, TrainingSettings

DOC = Path(__file__).resolve().parents[3] / "docs" / "training.md"
S, E = JobState, JobEvent


def _snap(state: JobState, **kw: object) -> JobSnapshot:
    return JobSnapshot(state, created_at=0.0, attempts=int(kw.pop("attempts", 0)), **kw)  # type: ignore[arg-type]


@pytest.mark.unit
def test_every_state_is_reachable_and_every_unfinished_one_can_end() -> None:
    seen, todo = {INITIAL_STATE}, [INITIAL_STATE]
    while todo:
        s = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(JobState)
    for s in set(JobState) - TERMINAL_STATES:
        assert any(src is s and dst in TERMINAL_STATES for (src, _), dst in TRANSITIONS.items()), s
    assert not any(src in TERMINAL_STATES for src, _ in TRANSITIONS)
    with pytest.raises(FleetMisuseError):
        transition(S.SUCCEEDED, E.RETRY)


@pytest.mark.unit
def test_the_docs_show_the_current_table() -> None:
    assert render_table() in DOC.read_text()


@pytest.mark.unit
def test_decisions() -> None:
    assert decide(_snap(S.QUEUED), 0, 60, 3).events == (E.STARTED,)
    assert decide(_snap(S.WAITING_DATA), 10, 60, 3).work is Work.WAIT_DATA
    assert decide(_snap(S.WAITING_DATA), 61, 60, 3).events == (E.DATA_TIMEOUT,)
    assert decide(_snap(S.TRAINING), 0, 60, 3) .work is Work.TRAIN
    resumed = decide(_snap(S.TRAINING, attempts=1, resumed=True), 0, 60, 3)
    assert (resumed.events, resumed.work) == ((E.RETRY,), Work.TRAIN)
    assert decide(_snap(S.BUILDING, attempts=3, resumed=True), 0, 60, 3).events == (E.INTERRUPTED,)
    assert decide(_snap(S.BUILDING, attempts=3), 0, 60, 3).events == (E.INTERRUPTED,)  # killed its worker
    assert decide(_snap(S.TRAINING, cancel_requested=True), 0, 60, 3).events == (E.CANCEL_REQUESTED,)
    # publishing finishes as a whole: a cancel does not cut it
    assert decide(_snap(S.PUBLISHING, cancel_requested=True), 0, 60, 3).work is Work.PUBLISH
    assert decide(_snap(S.AWAITING_APPROVAL), 0, 60, 3) == decide(_snap(S.SUCCEEDED), 0, 60, 3)
    assert decide(_snap(S.AWAITING_APPROVAL, approval="approved"), 0, 60, 3).work is Work.ROLLOUT
    assert decide(_snap(S.AWAITING_APPROVAL, approval="rejected"), 0, 60, 3).events == (E.REJECTED,)


@pytest.mark.unit
def test_the_documented_policy_parses_and_bad_ones_are_refused() -> None:
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    TrainingSettings(policies=(TrainingPolicy.model_validate(json.loads(block.group(1))),))
    base = json.loads(block.group(1))
    for bad in ({"trainer": {}}, {"trainer": {"entry_point": "x:y", "command": ["t"]}},
                {"trainer": {"entry_point": "not an entry"}}, {"labeler": "os.system"},
                {"strategy": {"kind": "canary", "stages": [50]}}, {"thresholds": {"nonsense": 1}},
                {"rollout": "sometimes"}):
        with pytest.raises(ValidationError):
            TrainingPolicy.model_validate({**base, **bad})


@pytest.mark.unit
def test_progress_lines_and_trainer_output_checks(tmp_path: Path) -> None:
    assert parse_progress("progress: 0.5 fitting") == (0.5, "fitting")
    assert parse_progress("progress: 7") == (1.0, "")
    assert parse_progress("progress: nan x") is None and parse_progress("hello") is None
    with pytest.raises(FleetInputError, match=r"no model\.onnx"):
        read_output(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    for metrics in ("not json", '{"a": "b"}', '{"a": NaN}', '{"a": true}'):
        (tmp_path / "metrics.json").write_text(metrics)
        with pytest.raises(FleetInputError, match=r"metrics\.json"):
            read_output(tmp_path)
    (tmp_path / "metrics.json").write_text('{"a": 1}')
    assert read_output(tmp_path).metrics == {"a": 1.0}

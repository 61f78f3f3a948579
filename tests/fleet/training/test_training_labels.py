"""Training prefers the labels devices sent back: the policy's labeler runs only on the rows
without one; with no labeler, only the device-labelled rows are trained on (none: refused)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.contract.collect import CollectPolicy
from agent.telemetry.collect import ChunkUploader, SampleCollector
from fleet.errors import FleetInputError
from fleet.registry.datasets import DatasetStore
from fleet.training.policy import TrainingPolicy
from fleet.training.steps import StepContext, _collected_rows
from simulators.trainer import oracle_labels
from tests.support.fakes import FakeClock

COLLECT = CollectPolicy(policy_id="lab-t", max_rows=40, chunk_bytes=64 * 1024)


def _policy(labeler: str | None) -> TrainingPolicy:
    return TrainingPolicy.model_validate({"model": "mlp", "reference_data": "r.npz", "labeler": labeler,
                                          "trainer": {"entry_point": "simulators.trainer:train"}})


def _world(tmp: Path, labelled: int) -> tuple[StepContext, Any, np.ndarray, list[str]]:
    x = np.random.default_rng(0).normal(size=(40, 32))
    c = SampleCollector(COLLECT, 32, "dev-1", FakeClock())
    ids = [f"e-{n}" for n in range(40)]
    c.offer(x, None, ids)
    truth = oracle_labels(x.astype(np.float32))
    c.label(ids[:labelled], [float((t + 1) % 4) for t in truth[:labelled]])  # not what the labeler says
    store = DatasetStore(tmp / "d.db")
    for _, payload in ChunkUploader(tmp / "up", COLLECT, "dev-1", c.archive()).pending():
        store.ingest_chunk("dev-1", payload)
    lines: list[str] = []
    ctx = StepContext(None, None, store, None, tmp, lines.append, lambda f, t: None,  # type: ignore[arg-type]
                      lambda: False)
    job = SimpleNamespace(dataset_ids=[v.dataset_id for v in store.versions()])
    (tmp / "work").mkdir()
    return ctx, job, truth, lines


@pytest.mark.integration
def test_device_labels_win_and_the_labeler_labels_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[3]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    ctx, job, truth, lines = _world(tmp_path, labelled=10)
    x, y = _collected_rows(ctx, job, _policy("simulators.trainer:oracle_labels"), tmp_path / "work")
    assert x.shape == (40, 32) and y.dtype == np.int64
    np.testing.assert_array_equal(y[:10], (truth[:10] + 1) % 4)  # the device's, not the labeler's
    np.testing.assert_array_equal(y[10:], truth[10:])
    assert any("10 rows labelled by devices, 30 by the labeler" in line for line in lines)
    ctx.datasets.close()  # type: ignore[union-attr]


@pytest.mark.integration
def test_without_a_labeler_only_device_labelled_rows_are_used(tmp_path: Path) -> None:
    ctx, job, truth, _ = _world(tmp_path, labelled=7)
    x, y = _collected_rows(ctx, job, _policy(None), tmp_path / "work")
    assert x.shape == (7, 32)
    np.testing.assert_array_equal(y, (truth[:7] + 1) % 4)
    ctx.datasets.close()  # type: ignore[union-attr]


@pytest.mark.integration
def test_without_labels_or_a_labeler_the_dataset_is_refused(tmp_path: Path) -> None:
    ctx, job, _, _ = _world(tmp_path, labelled=0)
    with pytest.raises(FleetInputError, match="no labels and the policy names no labeler"):
        _collected_rows(ctx, job, _policy(None), tmp_path / "work")
    ctx.datasets.close()  # type: ignore[union-attr]

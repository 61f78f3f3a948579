"""The trainer interface: what a user's trainer gets and what it must leave behind.

The fleet prepares a job directory and runs the trainer in a subprocess:

- `reference.npz` (the training share of the policy's reference data: `x` float rows, `y` int
  class labels), `train.npz` (the training share of the collected rows, labelled: `x`, `y`,
  and `dataset_ids`), `parent.onnx` (the model being replaced) and `job.json` (a `TrainerJob`);
- the trainer writes `out/model.onnx` and `out/metrics.json` (a JSON object of names to finite
  numbers) into the output directory, and may print `progress: <0..1> <text>` lines.

A Python entry point `module:function` is called as `function(job: TrainerJob)` by
`python -m fleet.training.harness` (its `job.progress(fraction, text)` prints the progress
lines; returning a dict of metrics writes `metrics.json` for it). A command gets the paths
through its argv placeholders (`{job}`, `{reference}`, `{train}`, `{out}`, `{parent_model}`).

Pure records and the check of a trainer's output; the subprocess is `fleet.training.runner`'s.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet.errors import FleetInputError

MAX_MODEL_BYTES = 256 * 1024 * 1024
MAX_METRICS_BYTES = 64 * 1024
PROGRESS_PREFIX = "progress:"


@dataclass(frozen=True)
class TrainerJob:
    """`job.json`: every path the trainer reads or writes, and the job's identity."""

    job_id: str
    model: str
    parent_version: str
    reference: str
    train: str
    parent_model: str
    out_dir: str
    seed: int = 0

    def progress(self, fraction: float, text: str = "") -> None:
        """Report progress (a line on stdout the fleet parses into the job's progress)."""
        print(f"{PROGRESS_PREFIX} {min(max(float(fraction), 0.0), 1.0):.4f} {text}", flush=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> TrainerJob:
        """Raises FleetInputError (unreadable or not a job document)."""
        try:
            doc = json.loads(Path(path).read_text())
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise FleetInputError(f"{path} is not a training job document: {exc}") from None


@dataclass(frozen=True)
class TrainerOutput:
    """What a trainer left behind, checked: the model's bytes and its metrics."""

    model: bytes
    metrics: dict[str, float]


def parse_progress(line: str) -> tuple[float, str] | None:
    """`progress: 0.4 fitting` -> (0.4, "fitting"); None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    parts = line[len(PROGRESS_PREFIX):].strip().split(" ", 1)
    try:
        frac = float(parts[0])
    except ValueError:
        return None
    if not math.isfinite(frac):
        return None
    return min(max(frac, 0.0), 1.0), parts[1] if len(parts) > 1 else ""


def read_output(out_dir: Path) -> TrainerOutput:
    """Check `out/model.onnx` and `out/metrics.json`. Raises FleetInputError naming the problem
    (missing, too large, not a JSON object of finite numbers); the model's format is checked
    by the bundle pipeline (it must load as ONNX)."""
    model_path, metrics_path = Path(out_dir) / "model.onnx", Path(out_dir) / "metrics.json"
    for p, cap in ((model_path, MAX_MODEL_BYTES), (metrics_path, MAX_METRICS_BYTES)):
        if not p.is_file() or p.is_symlink():
            raise FleetInputError(f"the trainer wrote no {p.name}")
        if p.stat().st_size > cap:
            raise FleetInputError(f"the trainer's {p.name} is over {cap} bytes")
    try:
        metrics: Any = json.loads(metrics_path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FleetInputError(f"the trainer's metrics.json is not JSON: {exc}") from None
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in metrics.items()):
        raise FleetInputError("the trainer's metrics.json must be an object of names to finite numbers")
    model = model_path.read_bytes()
    if not model:
        raise FleetInputError("the trainer's model.onnx is empty")
    return TrainerOutput(model, {k: float(v) for k, v in metrics.items()})


def write_metrics(out_dir: Path, metrics: dict[str, float]) -> None:
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))


def stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

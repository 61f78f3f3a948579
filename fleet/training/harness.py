"""`python -m fleet.training.harness`: run a Python entry point in the trainer's subprocess.

`train JOB_JSON ENTRY`: import `module:function`, call it with the `TrainerJob`; a returned
dict of metrics is written as `metrics.json`. `label X_NPZ Y_NPZ ENTRY`: call `function(x)`
and save its labels (a 1-D integer array as long as `x`) as `y` in `Y_NPZ`.
Exit status 0 on success, 2 for a bad entry point or output, 1 when the user's code raised
(its traceback goes to stderr, which the fleet keeps in the job's log).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleet.training.interface import TrainerJob, stderr, write_metrics


def load(entry: str) -> Callable[..., Any]:
    module, _, name = entry.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise TypeError(f"{entry} is not a callable")
    return fn


def _train(job_path: str, entry: str) -> int:
    job = TrainerJob.from_file(Path(job_path))
    result = load(entry)(job)
    if isinstance(result, dict):
        write_metrics(Path(job.out_dir), {str(k): float(v) for k, v in result.items()})
    return 0


def _label(x_path: str, y_path: str, entry: str) -> int:
    with np.load(x_path, allow_pickle=False) as z:
        x = np.asarray(z["x"])
    y = np.asarray(load(entry)(x))
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        stderr(f"labeler returned {y.dtype} {y.shape}, want {x.shape[0]} integer labels")
        return 2
    np.savez(y_path, y=y.astype(np.int64))
    return 0


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "train":
            return _train(argv[1], argv[2])
        if len(argv) == 4 and argv[0] == "label":
            return _label(argv[1], argv[2], argv[3])
    except (ImportError, TypeError, AttributeError) as exc:
        stderr(f"bad entry point: {exc}")
        traceback.print_exc()
        return 2
    except Exception:  # the user's code failed: its traceback is the job's log
        traceback.print_exc()
        return 1
    stderr("usage: python -m fleet.training.harness train JOB_JSON ENTRY | label X_NPZ Y_NPZ ENTRY")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

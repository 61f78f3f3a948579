"""MLflow model directories laid out on disk as MLflow's file store writes them.

`mlruns_model` writes `<root>/mlruns/<experiment>/<run_id>/` with `meta.yaml`, `params/`,
`metrics/` (`timestamp value step` lines), `tags/` and the logged model under
`artifacts/model/` (`MLmodel` YAML + `model.onnx`): the layout `mlflow.log_artifacts` produces
(checked against a real MLflow client in tests/fleet/registry/test_mlflow_import.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulators.models import make_mlp_onnx

RUN_ID = "8c1f0e6a2b7d4e9f9a0b1c2d3e4f5a6b"
SIZES = (32, 16, 4)


def mlmodel_text(run_id: str = RUN_ID, metadata: str = "") -> str:
    return ("artifact_path: model\nflavors:\n  onnx:\n    data: model.onnx\n    onnx_version: 1.16.0\n"
            "  python_function:\n    data: model.onnx\n    loader_module: mlflow.onnx\n"
            f"mlflow_version: 3.1.0\nmodel_uuid: 5f2e\nrun_id: {run_id}\n"
            "utc_time_created: '2026-11-30 10:00:00.000000'\n" + metadata)


def mlruns_model(root: Path, run_id: str = RUN_ID, seed: int = 1, metadata: str = "") -> Path:
    """Write a run with params lr/epochs, metrics acc (logged twice) and a git commit tag; the model dir."""
    run = root / "mlruns" / "412" / run_id
    model_dir = run / "artifacts" / "model"
    model_dir.mkdir(parents=True)
    (run / "meta.yaml").write_text(f"artifact_uri: file://{run}/artifacts\nexperiment_id: '412'\n"
                                   f"lifecycle_stage: active\nrun_id: {run_id}\nrun_name: calm-owl\n"
                                   "status: 3\n")
    for folder, entries in {
        "params": {"lr": "0.01", "epochs": "5", "optimizer": "adam"},
        "metrics": {"acc": "1796295583000 0.81 0\n1796295583900 0.93 1\n", "loss": "1796295583900 0.2 1\n"},
        "tags": {"mlflow.source.git.commit": "c0ffee1234", "mlflow.runName": "calm-owl",
                 "mlflow.user": "someone"},
    }.items():
        (run / folder).mkdir()
        for name, text in entries.items():
            (run / folder / name).write_text(text)
    (model_dir / "model.onnx").write_bytes(make_mlp_onnx(seed, sizes=SIZES))
    (model_dir / "MLmodel").write_text(mlmodel_text(run_id, metadata))
    return model_dir


def reference_rows(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, SIZES[0])).astype(np.float32)

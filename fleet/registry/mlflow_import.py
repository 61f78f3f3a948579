"""Register a model version from an MLflow model directory (`MLmodel` with an `onnx` flavor).

Reads the `MLmodel` YAML, hashes the ONNX file named by `flavors.onnx.data`, and records
lineage from what MLflow keeps there: run id, model uuid, MLflow version, creation time,
and — when the training code logged them in `metadata` — `training_code_ref` (or
`git_commit`), `dataset_ref`, `dataset_digest`, `hyperparameters` and `metrics`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from fleet.errors import FleetInputError, NotFound
from fleet.registry.versions import ModelVersion
from fleet.store import Store

MAX_MLMODEL_BYTES = 1024 * 1024
MAX_ARTIFACT_BYTES = 2 * 1024 * 1024 * 1024
_CHUNK = 1024 * 1024


def resolve_import_path(import_dir: Path, requested: str) -> Path:
    """`requested` resolved inside `import_dir`; raises FleetInputError if it escapes or is missing.

    The route takes a server-side path, so it is confined to one directory the operator
    chose: a caller must not make the service read arbitrary files.
    """
    root = import_dir.resolve()
    try:
        path = (root / requested).resolve()
        has_mlmodel = (path / "MLmodel").is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FleetInputError(f"path {requested!r} is not a usable path: {reason}") from None
    if path != root and root not in path.parents:
        raise FleetInputError(f"path {requested!r} is outside the import directory")
    if not has_mlmodel:
        raise FleetInputError(f"path {requested!r} is not an MLflow model directory (no MLmodel file)")
    return path


def _sha256_file(path: Path, limit: int) -> str:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise FleetInputError(f"{path.name} is larger than {limit} bytes")
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_mlmodel(model_dir: Path) -> dict[str, Any]:
    """Parse `MLmodel`; raises FleetInputError when absent, too big, not YAML, or without onnx flavor."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise FleetInputError(f"{model_dir} has no MLmodel file")
    raw = mlmodel.read_bytes()
    if len(raw) > MAX_MLMODEL_BYTES:
        raise FleetInputError(f"{mlmodel} is larger than {MAX_MLMODEL_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise FleetInputError(f"{mlmodel} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise FleetInputError(f"{mlmodel} has no 'flavors' mapping")
    onnx = doc["flavors"].get("onnx")
    if not isinstance(onnx, dict) or not isinstance(onnx.get("data"), str):
        raise FleetInputError(f"{mlmodel} has no onnx flavor with a 'data' path "
                              f"(flavors: {', '.join(map(str, doc['flavors']))})")
    return doc


def lineage_from_mlmodel(doc: dict[str, Any]) -> dict[str, Any]:
    """The lineage record for a version, from an `MLmodel` document.

    Raises `FleetInputError` for malformed metadata.
    """
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    source = {k: str(doc[k]) for k in ("run_id", "model_uuid", "mlflow_version", "utc_time_created",
                                       "artifact_path") if doc.get(k) is not None}
    source["flavor"] = "onnx"
    lineage: dict[str, Any] = {"source": source}
    code = meta.get("training_code_ref") or meta.get("git_commit")
    if code is not None:
        lineage["training_code_ref"] = str(code)
    for key in ("dataset_ref", "dataset_digest"):
        if meta.get(key) is not None:
            lineage[key] = str(meta[key])
    for key in ("hyperparameters", "metrics"):
        value = meta.get(key)
        if value is not None:
            if not isinstance(value, dict):
                raise FleetInputError(f"MLmodel metadata.{key} must be a mapping")
            lineage[key] = value
    if "metrics" in lineage:
        try:
            lineage["metrics"] = {str(k): float(v) for k, v in lineage["metrics"].items()}
        except (TypeError, ValueError) as exc:
            raise FleetInputError(f"MLmodel metadata.metrics must map names to numbers: {exc}") from exc
    return lineage


def import_mlflow_model(store: Store, model_dir: Path, model: str, version: str, actor: str,
                        max_artifact_bytes: int = MAX_ARTIFACT_BYTES) -> ModelVersion:
    """Register `model`@`version` from an MLflow directory, creating the model if needed.

    Raises FleetInputError (bad directory, YAML, data path), Conflict (version exists).
    """
    doc = read_mlmodel(model_dir)
    try:
        data = (model_dir / doc["flavors"]["onnx"]["data"]).resolve()
        usable = model_dir.resolve() in data.parents and data.is_file()
    except (OSError, ValueError):  # a NUL byte or an overlong name in the MLmodel file
        usable = False
    if not usable:
        raise FleetInputError(f"flavors.onnx.data {doc['flavors']['onnx']['data']!r} is not a file "
                              f"inside {model_dir}")
    digest = _sha256_file(data, max_artifact_bytes)
    lineage = lineage_from_mlmodel(doc)
    with store.tx():
        try:
            store.models.get_model(model)
        except NotFound:
            run = lineage["source"].get("run_id", "?")
            store.models.create_model(model, f"imported from MLflow run {run}", actor)
        return store.models.register_version(model, version, digest, "onnx", lineage, actor)

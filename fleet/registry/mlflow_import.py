"""Register a deployable model version from an MLflow model directory (`MLmodel`, `onnx` flavor).

Reads the `MLmodel` YAML, hashes the ONNX file named by `flavors.onnx.data`, and records
lineage from what MLflow keeps: run id, model uuid, MLflow version, creation time; the run's
params (as `hyperparameters`), latest metrics and git commit (`training_code_ref`) from its run
directory (`fleet.registry.mlflow_runs`); and, when the training code logged them in
`metadata`, `training_code_ref` (or `git_commit`), `dataset_ref`, `dataset_digest`,
`hyperparameters` and `metrics` (the run's params and metrics win on a shared key: MLflow wrote
them; a `training_code_ref` in `metadata` wins over the git tag: it was written on purpose).

A version with no bundle cannot be rolled out, so an import either builds the bundle from the
MLflow model right away (`fleet.registry.builder` with the operator's reference data, published
as a TUF target) or registers the version with MLflow's artifact digest for a bundle to be
attached later (`fleet.registry.publish` attaches one whose model digest matches). The bundle's
model is MLflow's artifact byte for byte: no quantization here (an int8 model is another
artifact: build and publish it as its own version).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agent.contract.manifest import Lineage
from fleet.errors import FleetInputError, NotFound
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.mlflow_runs import GIT_COMMIT_TAG, RUN_NAME_TAG, RunRecord, param_value, run_for_model
from fleet.registry.publish import publish_bundle
from fleet.registry.versions import ModelVersion
from fleet.store import Store
from fleet.trust.repository import Repository

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


def lineage_from_mlmodel(doc: dict[str, Any], run: RunRecord | None = None) -> dict[str, Any]:
    """The lineage record for a version, from an `MLmodel` document and the run behind it.

    Raises `FleetInputError` for malformed metadata.
    """
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    keys = ("run_id", "model_uuid", "model_id", "mlflow_version", "utc_time_created", "artifact_path")
    source = {k: str(doc[k]) for k in keys if doc.get(k) is not None}
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
    if run is not None:
        source["run_id"] = run.run_id
        if run.tags.get(RUN_NAME_TAG):
            source["run_name"] = run.tags[RUN_NAME_TAG]
        if run.params:
            lineage["hyperparameters"] = {**lineage.get("hyperparameters", {}),
                                          **{k: param_value(v) for k, v in run.params.items()}}
        if run.metrics:
            lineage["metrics"] = {**lineage.get("metrics", {}), **run.metrics}
        if "training_code_ref" not in lineage and run.tags.get(GIT_COMMIT_TAG):
            lineage["training_code_ref"] = run.tags[GIT_COMMIT_TAG]
    return lineage


@dataclass(frozen=True)
class MlflowModel:
    """An MLflow model directory, read and checked: its ONNX file, that file's digest, its lineage."""

    model_dir: Path
    onnx_path: Path
    digest: str
    lineage: dict[str, Any]

    def bundle_metadata(self, name: str, version: str, base: BundleMetadata | None = None) -> BundleMetadata:
        """Bundle metadata for this model: `base`'s settings with name, version and MLflow's lineage.

        Raises FleetInputError when `base` asks for quantization (the bundle must carry MLflow's
        artifact, whose digest the version records).
        """
        base = base or BundleMetadata(name=name, version=version)
        if base.quantize != "none":
            raise FleetInputError("an MLflow import ships MLflow's model as is: quantize it with "
                                  "`bundle build --quantize` and publish that as its own version")
        lin = self.lineage
        lineage = Lineage(
            training_code_ref=str(lin.get("training_code_ref", "")),
            dataset_ref=str(lin.get("dataset_ref", "")),
            dataset_digest=str(lin.get("dataset_digest", "")),
            hyperparameters=dict(lin.get("hyperparameters", {})),
            metrics=dict(lin.get("metrics", {})),
        )
        return base.model_copy(update={"name": name, "version": version, "lineage": lineage})


def load_mlflow_model(model_dir: Path, *, run: RunRecord | None = None, run_dir: Path | None = None,
                      root: Path | None = None, max_artifact_bytes: int = MAX_ARTIFACT_BYTES) -> MlflowModel:
    """Read `model_dir`'s MLmodel, hash its ONNX file and gather lineage (`run`, else its run directory).

    `root` confines the search for the run directory (server-side imports). Raises
    FleetInputError (no/bad MLmodel, ONNX path outside the directory, bad run metadata).
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
    if run is None:
        run_id = doc.get("run_id")
        run = run_for_model(model_dir, None if run_id is None else str(run_id), run_dir, root)
    digest = _sha256_file(data, max_artifact_bytes)
    return MlflowModel(model_dir, data, digest, lineage_from_mlmodel(doc, run))


def build_mlflow_bundle(mm: MlflowModel, name: str, version: str, out: Path, *,
                        reference: np.ndarray | None, no_profile: bool = False,
                        base: BundleMetadata | None = None) -> Path:
    """Build the bundle of an MLflow model with `fleet.registry.builder` (errors as `build_bundle`'s)."""
    return build_bundle(mm.onnx_path, mm.bundle_metadata(name, version, base), out,
                        reference_data=reference, no_profile=no_profile)


def load_reference(path: Path) -> np.ndarray:
    """Reference rows from a `.npy` file (no pickles); FleetInputError when unreadable."""
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise FleetInputError(f"cannot load reference data {path.name}: {exc}") from None


def import_mlflow_model(store: Store, model_dir: Path, model: str, version: str, actor: str,
                        max_artifact_bytes: int = MAX_ARTIFACT_BYTES, *, repo: Repository | None = None,
                        reference: np.ndarray | None = None, no_profile: bool = False,
                        root: Path | None = None, scratch: Path | None = None) -> ModelVersion:
    """Register `model`@`version` from an MLflow directory, creating the model if needed.

    With `repo` (and `reference` rows, or `no_profile`), the bundle is built from the MLflow
    model and published as a TUF target, so the version is deployable at once; without, the
    version records MLflow's artifact digest and waits for a bundle with that model digest
    (`publish_bundle` attaches it). `scratch` is where the bundle is built (the data directory).

    Raises FleetInputError (bad directory, YAML, data path, reference data), Conflict (version
    exists).
    """
    mm = load_mlflow_model(model_dir, root=root, max_artifact_bytes=max_artifact_bytes)
    run = mm.lineage["source"].get("run_id", "?")
    if repo is not None:
        with tempfile.TemporaryDirectory(prefix="mlflow-build-", dir=scratch) as tmp:
            built = build_mlflow_bundle(mm, model, version, Path(tmp) / "bundle.efb",
                                        reference=reference, no_profile=no_profile)
            return publish_bundle(store, repo, built, model, actor, source=mm.lineage["source"],
                                  description=f"imported from MLflow run {run}")
    with store.tx():
        try:
            store.models.get_model(model)
        except NotFound:
            store.models.create_model(model, f"imported from MLflow run {run}", actor)
        return store.models.register_version(model, version, mm.digest, "onnx", mm.lineage, actor)

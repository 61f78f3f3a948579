"""Register a model version from a built bundle: check it, add it to the TUF repository, record it.

The bundle is checked the way a device will check it (`extract_bundle` into a scratch
directory verifies the manifest, member digests and limits) before anything is published,
so a broken bundle never reaches the repository. Its manifest names the model and the
version; the registry's model must have the same name, because devices identify a bundle
as `name-version` (director documents, reported state, events). The TUF target is
`models/<name>/<name>-<version>.efb` with custom `{name, version}` labels. The version's lineage
is the manifest's (`lineage`: refs, hyperparameters, metrics) plus its `quantization` block
(scheme, calibration figures, accuracy delta, agreement) and the bundle's `source`.

A version registered without a bundle (an MLflow import, `POST /v1/models/{name}/versions`)
gets one attached instead: the bundle's model digest and runtime must be the ones the version
recorded (versions are immutable, so the lineage stays as registered), and the target is then
recorded in the version. Without that, such a version could never be deployed.

Errors: `publish_bundle` raises FleetInputError (bad or mismatched bundle), NotFound
(unknown model when `create_model` is false) and Conflict (version already has a bundle, or
its recorded artifact is not the bundle's model).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from agent.contract.bundle import extract_bundle
from agent.errors import EdgefleetError
from fleet.errors import Conflict, FleetInputError, NotFound
from fleet.registry.versions import ModelVersion
from fleet.store import Store
from fleet.trust.repository import Repository, sha256_file

#: Serialises writers of the repository in this process (bundle publishing, timestamp refresh):
#: each bumps metadata versions read from disk, so two at once could reuse a version.
REPO_LOCK = threading.Lock()


def target_path_for(name: str, version: str) -> str:
    return f"models/{name}/{name}-{version}.efb"


def publish_bundle(store: Store, repo: Repository, bundle: Path, model: str, actor: str,
                   create_model: bool = True, *, source: dict[str, Any] | None = None,
                   description: str | None = None, published: Path | None = None) -> ModelVersion:
    """Check `bundle`, publish it as a TUF target and register it as a version of `model`
    (or attach it to that version when it was registered without a bundle).

    `source` adds to the lineage's `source` record (an MLflow run), `description` is the
    model's when it is created here. `published` is the file put in the repository instead of
    `bundle` (its sealed form, `fleet.registry.sealing`: the checks run on the plain bundle).
    Raises `FleetInputError` (not a valid bundle, bundle of
    another model), `NotFound` (no such model and `create_model` is false) and `Conflict` (the
    version has a bundle, or records another artifact).
    """
    with tempfile.TemporaryDirectory(prefix="efb-check-") as scratch:
        try:
            manifest = extract_bundle(Path(bundle), Path(scratch) / "b", durable=False).manifest
        except EdgefleetError as exc:
            raise FleetInputError(f"bundle {Path(bundle).name} is not valid: {exc}") from None
    if manifest.name != model:
        raise FleetInputError(f"bundle is for model {manifest.name!r}, not {model!r}")
    try:
        store.models.get_model(model)
    except NotFound:
        if not create_model:
            raise
        store.models.create_model(model, description or f"registered from bundle {manifest.bundle_id}", actor)
    try:
        existing = store.models.get_version(model, manifest.version)
    except NotFound:
        existing = None
    if existing is not None and existing.bundle_target is not None:
        raise Conflict(f"version {manifest.version!r} of model {model!r} already exists "
                       f"(bundle {existing.bundle_target})")
    if existing is not None and (existing.artifact_digest, existing.runtime) != (manifest.model_digest,
                                                                                   manifest.runtime):
        raise Conflict(f"version {existing.id} was registered with {existing.runtime} artifact "
                       f"{existing.artifact_digest}, but this bundle's model is {manifest.runtime} "
                       f"{manifest.model_digest}: a version is immutable, publish this bundle as a new "
                       "version")
    path = target_path_for(model, manifest.version)
    with REPO_LOCK:
        repo.add_target(Path(published or bundle), path, {"name": manifest.name, "version": manifest.version})
    if existing is not None:
        return store.models.set_bundle_target(model, manifest.version, path, actor)
    # Everything the manifest says about lineage and quantization (the gate's figures included):
    # versions are immutable, so what is not copied now is lost to the registry for good.
    lineage: dict[str, Any] = {
        "source": {**(source or {}), "bundle_sha256": sha256_file(Path(published or bundle)),
                   "bundle_target": path},
        "metrics": dict(manifest.lineage.metrics),
        "hyperparameters": dict(manifest.lineage.hyperparameters),
        "quantization": manifest.quantization.model_dump(mode="json"),
    }
    for key in ("training_code_ref", "dataset_ref", "dataset_digest"):
        value = getattr(manifest.lineage, key)
        if value:
            lineage[key] = value
    return store.models.register_version(model, manifest.version, manifest.model_digest, manifest.runtime,
                                         lineage, actor, bundle_target=path)

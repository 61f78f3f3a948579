"""Model registry: models, their immutable versions, and the stage each version is in.

A version's artifact digest, runtime and lineage never change after registration (a
database trigger refuses it); only its stage moves, and every move is kept in
`stage_history` and the audit log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from agent.contract.manifest import DIGEST_RE, NAME_RE, SEMVER_RE
from fleet.db.audit import AuditRepo
from fleet.db.database import FleetDatabase
from fleet.db.paging import Page
from fleet.db.rows import Record, dumps
from fleet.errors import Conflict, FleetInputError, NotFound

Stage = Literal["registered", "staging", "canary", "production", "archived"]
STAGES: tuple[str, ...] = ("registered", "staging", "canary", "production", "archived")
TARGET_RE = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,254}$")


def version_id(model: str, version: str) -> str:
    return f"{model}:{version}"


@dataclass(frozen=True, slots=True)
class Model(Record):
    """A `models` row: a name that versions are registered under."""

    name: str
    description: str
    created_at: str
    created_by: str


@dataclass(frozen=True, slots=True)
class ModelVersion(Record):
    """A `model_versions` row; `id` is `<model>:<version>`, `lineage` the decoded JSON document."""

    JSON_COLUMNS = ("lineage",)

    id: str
    model_name: str
    version: str
    artifact_digest: str
    bundle_target: str | None
    runtime: str
    lineage: dict[str, Any]
    stage: Stage
    created_at: str
    created_by: str


@dataclass(frozen=True, slots=True)
class StageHistoryEntry(Record):
    """A `stage_history` row: one move of a version between stages."""

    id: int
    version_id: str
    from_stage: str | None
    to_stage: str
    actor: str
    note: str
    at: str


class ModelRepo:
    """Registry operations; every mutator takes the acting principal for the audit log."""

    def __init__(self, database: FleetDatabase, audit: AuditRepo) -> None:
        self.database = database
        self.audit = audit

    # -- models ---------------------------------------------------------------
    def create_model(self, name: str, description: str, actor: str) -> Model:
        """Raises FleetInputError for a bad name, Conflict if it exists."""
        if not NAME_RE.match(name):
            raise FleetInputError(f"model name {name!r} must match {NAME_RE.pattern}")
        row = {"name": name, "description": description, "created_at": self.database.now(),
               "created_by": actor}
        with self.database.tx() as db:
            try:
                db.insert("models", row)
            except Conflict as exc:
                raise Conflict(f"model {name!r} already exists") from exc
            self.audit.record(actor, "model.create", f"models/{name}", None, row)
        return Model.from_row(row)

    def get_model(self, name: str) -> Model:
        """Raises NotFound."""
        with self.database.read() as db:
            row = db.one("SELECT * FROM models WHERE name = :name", {"name": name})
        if not row:
            raise NotFound(f"model {name!r} not found")
        return Model.from_row(row)

    def list_models(self, cursor: str | None, limit: int) -> Page[Model]:
        return self.database.page_of("SELECT * FROM models WHERE TRUE", {}, "name", cursor, limit,
                                     Model.from_row)

    # -- versions -------------------------------------------------------------
    def register_version(
        self,
        model: str,
        version: str,
        artifact_digest: str,
        runtime: str,
        lineage: dict[str, Any],
        actor: str,
        bundle_target: str | None = None,
    ) -> ModelVersion:
        """Add an immutable version. Raises FleetInputError, NotFound (model), Conflict."""
        if not SEMVER_RE.match(version):
            raise FleetInputError(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH)")
        if not DIGEST_RE.match(artifact_digest):
            raise FleetInputError(f"artifact digest {artifact_digest!r} must be sha256:<64 hex>")
        if runtime not in ("onnx", "tflite"):
            raise FleetInputError(f"runtime {runtime!r} must be 'onnx' or 'tflite'")
        if bundle_target is not None and not TARGET_RE.match(bundle_target):
            raise FleetInputError(f"bundle target {bundle_target!r} is not a valid target path")
        row = {
            "id": version_id(model, version),
            "model_name": model,
            "version": version,
            "artifact_digest": artifact_digest,
            "bundle_target": bundle_target,
            "runtime": runtime,
            "lineage": dumps(lineage),
            "stage": "registered",
            "created_at": self.database.now(),
            "created_by": actor,
        }
        with self.database.tx() as db:
            self.get_model(model)
            try:
                db.insert("model_versions", row)
            except Conflict as exc:
                raise Conflict(f"version {version!r} of model {model!r} already exists") from exc
            db.insert(
                "stage_history", {"version_id": row["id"], "from_stage": None, "to_stage": "registered",
                                  "actor": actor,
                 "note": "registered", "at": row["created_at"]}
            )
            out = ModelVersion.from_row(row)
            self.audit.record(actor, "model_version.create", f"models/{model}/versions/{version}",
                              None, out.to_dict())
        return out

    def get_version(self, model: str, version: str) -> ModelVersion:
        """Raises NotFound."""
        with self.database.read() as db:
            row = db.one("SELECT * FROM model_versions WHERE id = :id", {"id": version_id(model, version)})
        if not row:
            raise NotFound(f"version {version!r} of model {model!r} not found")
        return ModelVersion.from_row(row)

    def get_version_by_id(self, vid: str) -> ModelVersion:
        """Look up `<model>:<version>`; raises NotFound."""
        model, _, version = vid.partition(":")
        return self.get_version(model, version)

    def list_versions(self, model: str, cursor: str | None, limit: int,
                      stage: str | None = None) -> Page[ModelVersion]:
        """Raises NotFound for an unknown model, FleetInputError for an unknown stage."""
        self.get_model(model)
        sql, params = "SELECT * FROM model_versions WHERE model_name = :model", {"model": model}
        if stage is not None:
            if stage not in STAGES:
                raise FleetInputError(f"stage {stage!r} must be one of {', '.join(STAGES)}")
            sql += " AND stage = :stage"
            params["stage"] = stage
        return self.database.page_of(sql, params, "id", cursor, limit, ModelVersion.from_row)

    def set_stage(self, model: str, version: str, to_stage: str, actor: str, note: str = "") -> ModelVersion:
        """Move a version to `to_stage`. Archived is final; moving to the current stage is refused.

        Raises NotFound, FleetInputError (unknown stage), Conflict (refused transition).
        """
        if to_stage not in STAGES:
            raise FleetInputError(f"stage {to_stage!r} must be one of {', '.join(STAGES)}")
        with self.database.tx() as db:
            before = self.get_version(model, version)
            if before.stage == "archived":
                raise Conflict(f"{before.id} is archived; register a new version instead")
            if before.stage == to_stage:
                raise Conflict(f"{before.id} is already in stage {to_stage!r}")
            db.execute("UPDATE model_versions SET stage = :stage WHERE id = :id",
                       {"stage": to_stage, "id": before.id})
            db.insert(
                "stage_history", {"version_id": before.id, "from_stage": before.stage, "to_stage": to_stage,
                 "actor": actor, "note": note, "at": self.database.now()}
            )
            after = self.get_version(model, version)
            self.audit.record(actor, "model_version.stage", f"models/{model}/versions/{version}",
                              {"stage": before.stage}, {"stage": to_stage, "note": note})
        return after

    def set_bundle_target(self, model: str, version: str, target: str, actor: str) -> ModelVersion:
        """Record the TUF target path once the bundle is built; set only once (Conflict)."""
        if not TARGET_RE.match(target):
            raise FleetInputError(f"bundle target {target!r} is not a valid target path")
        with self.database.tx() as db:
            before = self.get_version(model, version)
            try:
                db.execute("UPDATE model_versions SET bundle_target = :target WHERE id = :id",
                           {"target": target, "id": before.id})
            except Conflict as exc:
                raise Conflict(f"{before.id} already has bundle target {before.bundle_target!r}") from exc
            self.audit.record(actor, "model_version.bundle", f"models/{model}/versions/{version}",
                              {"bundle_target": before.bundle_target}, {"bundle_target": target})
            return self.get_version(model, version)

    def stage_history(self, model: str, version: str) -> list[StageHistoryEntry]:
        vid = self.get_version(model, version).id
        with self.database.read() as db:
            rows = db.query("SELECT * FROM stage_history WHERE version_id = :vid ORDER BY id", {"vid": vid})
        return [StageHistoryEntry.from_row(r) for r in rows]

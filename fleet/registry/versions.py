"""Model registry: models, their immutable versions, and the stage each version is in.

A version's artifact digest, runtime and lineage never change after registration (a
SQLite trigger refuses it); only its stage moves, and every move is kept in
`stage_history` and the audit log.
"""

from __future__ import annotations

import re
import sqlite3
from typing import TYPE_CHECKING, Any, Literal

from agent.contract.manifest import DIGEST_RE, NAME_RE, SEMVER_RE
from fleet.db.store import Page, Row, decode_row, dumps
from fleet.errors import Conflict, FleetInputError, NotFound

if TYPE_CHECKING:
    from fleet.db.store import Store

Stage = Literal["registered", "staging", "canary", "production", "archived"]
STAGES: tuple[str, ...] = ("registered", "staging", "canary", "production", "archived")
TARGET_RE = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,254}$")
VERSION_JSON = ("lineage",)


def version_id(model: str, version: str) -> str:
    return f"{model}:{version}"


class ModelRepo:
    """Registry operations; every mutator takes the acting principal for the audit log."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- models ---------------------------------------------------------------
    def create_model(self, name: str, description: str, actor: str) -> Row:
        """Raises FleetInputError for a bad name, Conflict if it exists."""
        if not NAME_RE.match(name):
            raise FleetInputError(f"model name {name!r} must match {NAME_RE.pattern}")
        row = {"name": name, "description": description, "created_at": self.store.now(), "created_by": actor}
        with self.store.tx() as db:
            try:
                db.table("models").insert(row)
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"model {name!r} already exists") from exc
            self.store.audit.record(actor, "model.create", f"models/{name}", None, row)
        return row

    def get_model(self, name: str) -> Row:
        """Raises NotFound."""
        with self.store.read() as db:
            rows = list(db.query("SELECT * FROM models WHERE name = ?", [name]))
        if not rows:
            raise NotFound(f"model {name!r} not found")
        return rows[0]

    def list_models(self, cursor: str | None, limit: int) -> Page:
        return self.store.page("SELECT * FROM models WHERE 1", [], "name", cursor, limit)

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
    ) -> Row:
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
            "created_at": self.store.now(),
            "created_by": actor,
        }
        with self.store.tx() as db:
            self.get_model(model)
            try:
                db.table("model_versions").insert(row)
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"version {version!r} of model {model!r} already exists") from exc
            db.table("stage_history").insert(
                {"version_id": row["id"], "from_stage": None, "to_stage": "registered", "actor": actor,
                 "note": "registered", "at": row["created_at"]}
            )
            out = decode_row(row, VERSION_JSON)
            self.store.audit.record(actor, "model_version.create", f"models/{model}/versions/{version}",
                                    None, out)
        assert out is not None
        return out

    def get_version(self, model: str, version: str) -> Row:
        """Raises NotFound."""
        with self.store.read() as db:
            rows = list(db.query("SELECT * FROM model_versions WHERE id = ?", [version_id(model, version)]))
        if not rows:
            raise NotFound(f"version {version!r} of model {model!r} not found")
        out = decode_row(rows[0], VERSION_JSON)
        assert out is not None
        return out

    def get_version_by_id(self, vid: str) -> Row:
        """Look up `<model>:<version>`; raises NotFound."""
        model, _, version = vid.partition(":")
        return self.get_version(model, version)

    def list_versions(self, model: str, cursor: str | None, limit: int, stage: str | None = None) -> Page:
        """Raises NotFound for an unknown model, FleetInputError for an unknown stage."""
        self.get_model(model)
        sql, params = "SELECT * FROM model_versions WHERE model_name = ?", [model]
        if stage is not None:
            if stage not in STAGES:
                raise FleetInputError(f"stage {stage!r} must be one of {', '.join(STAGES)}")
            sql += " AND stage = ?"
            params.append(stage)
        return self.store.page(sql, params, "id", cursor, limit, VERSION_JSON)

    def set_stage(self, model: str, version: str, to_stage: str, actor: str, note: str = "") -> Row:
        """Move a version to `to_stage`. Archived is final; moving to the current stage is refused.

        Raises NotFound, FleetInputError (unknown stage), Conflict (refused transition).
        """
        if to_stage not in STAGES:
            raise FleetInputError(f"stage {to_stage!r} must be one of {', '.join(STAGES)}")
        with self.store.tx() as db:
            before = self.get_version(model, version)
            if before["stage"] == "archived":
                raise Conflict(f"{before['id']} is archived; register a new version instead")
            if before["stage"] == to_stage:
                raise Conflict(f"{before['id']} is already in stage {to_stage!r}")
            db.execute("UPDATE model_versions SET stage = ? WHERE id = ?", [to_stage, before["id"]])
            db.table("stage_history").insert(
                {"version_id": before["id"], "from_stage": before["stage"], "to_stage": to_stage,
                 "actor": actor, "note": note, "at": self.store.now()}
            )
            after = self.get_version(model, version)
            self.store.audit.record(actor, "model_version.stage", f"models/{model}/versions/{version}",
                                    {"stage": before["stage"]}, {"stage": to_stage, "note": note})
        return after

    def set_bundle_target(self, model: str, version: str, target: str, actor: str) -> Row:
        """Record the TUF target path once the bundle is built; set only once (Conflict)."""
        if not TARGET_RE.match(target):
            raise FleetInputError(f"bundle target {target!r} is not a valid target path")
        with self.store.tx() as db:
            before = self.get_version(model, version)
            try:
                db.execute("UPDATE model_versions SET bundle_target = ? WHERE id = ?", [target, before["id"]])
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"{before['id']} already has bundle target {before['bundle_target']!r}") \
                    from exc
            self.store.audit.record(actor, "model_version.bundle", f"models/{model}/versions/{version}",
                                    {"bundle_target": before["bundle_target"]}, {"bundle_target": target})
            return self.get_version(model, version)

    def stage_history(self, model: str, version: str) -> list[Row]:
        vid = self.get_version(model, version)["id"]
        with self.store.read() as db:
            return list(db.query("SELECT * FROM stage_history WHERE version_id = ? ORDER BY id", [vid]))

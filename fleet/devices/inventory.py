"""Device inventory: identity and labels from enrollment, facts from reported state.

Reported state arrives from devices (untrusted) through the publisher's callbacks; it
updates inventory columns but is not an operator change, so it is not audited (a heartbeat
per device per minute would drown the log). Enrollment, label edits and revocation are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent.contract.protocol import ReportedState
from agent.logs import log_event
from fleet.db.audit import AuditRepo
from fleet.db.database import FleetDatabase
from fleet.db.paging import Page
from fleet.db.rows import Record, dumps
from fleet.devices.selector import Selector, validate_labels
from fleet.errors import Conflict, FleetInputError, NotFound

PUBLIC_COLUMNS = (
    "id, labels, agent_version, runtimes, architecture, memory_mb, last_seen, online, "
    "reported_state, revoked, revoked_at, enrolled_at, broker_username, identity, cert_serial, "
    "cert_fingerprint, cert_not_after"
)
IDENTITIES = ("password", "cert")
MAX_REPORTED_STATE_BYTES = 64 * 1024
logger = logging.getLogger("edgefleet.fleet.inventory")


@dataclass(frozen=True, slots=True)
class Device(Record):
    """A `devices` row without its broker password hash (which never leaves `broker_credentials`).

    `reported_state` is the device's last report as it sent it (None before the first one).
    """

    JSON_COLUMNS = ("labels", "runtimes", "reported_state")
    FLAG_COLUMNS = ("online", "revoked")

    id: str
    labels: dict[str, str]
    agent_version: str | None
    runtimes: list[str]
    architecture: str | None
    memory_mb: int | None
    last_seen: str | None
    online: bool
    reported_state: dict[str, Any] | None
    revoked: bool
    revoked_at: str | None
    enrolled_at: str
    broker_username: str
    identity: str  # "password" (a line in the broker's password file) or "cert" (a client certificate)
    cert_serial: str | None  # the certificate the device CA issued at enrollment (identity "cert")
    cert_fingerprint: str | None
    cert_not_after: str | None


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What the inventory records of an issued certificate (`fleet.trust.device_ca.IssuedCertificate`)."""

    serial: str
    fingerprint: str
    not_after: str  # ISO 8601 UTC


class DeviceRepo:
    """Inventory operations; `record_reported_state` and `mark_offline` are the publisher's hooks."""

    def __init__(self, database: FleetDatabase, audit: AuditRepo) -> None:
        self.database = database
        self.audit = audit
        self.refused_reports = 0  # reports dropped by `on_reported` (unknown/revoked device, bad id)

    def create(
        self,
        device_id: str,
        labels: dict[str, str],
        facts: dict[str, Any],
        broker_username: str,
        broker_password_hash: str,
        actor: str,
        certificate: CertificateFacts | None = None,
    ) -> Device:
        """Insert an enrolled device. Raises FleetInputError (labels), Conflict (duplicate id).

        With `certificate` the device authenticates with it (identity "cert", no password-file
        line: pass an empty `broker_password_hash`); otherwise with its password.
        """
        now = self.database.now()
        row = {
            "id": device_id,
            "labels": dumps(validate_labels(labels)),
            "agent_version": facts.get("agent_version"),
            "runtimes": dumps(list(facts.get("runtimes") or [])),
            "architecture": facts.get("architecture"),
            "memory_mb": facts.get("memory_mb"),
            "last_seen": now,
            "online": 0,
            "reported_state": None,
            "revoked": 0,
            "enrolled_at": now,
            "broker_username": broker_username,
            "broker_password_hash": broker_password_hash,
            "identity": "cert" if certificate else "password",
            "cert_serial": certificate.serial if certificate else None,
            "cert_fingerprint": certificate.fingerprint if certificate else None,
            "cert_not_after": certificate.not_after if certificate else None,
        }
        with self.database.tx() as db:
            try:
                db.insert("devices", row)
            except Conflict as exc:
                raise Conflict(f"device {device_id!r} already exists") from exc
            out = self.get(device_id)
            self.audit.record(actor, "device.enroll", f"devices/{device_id}", None, out.to_dict())
        return out

    def get(self, device_id: str) -> Device:
        """Raises NotFound."""
        with self.database.read() as db:
            row = db.one(f"SELECT {PUBLIC_COLUMNS} FROM devices WHERE id = :id", {"id": device_id})  # noqa: S608
        if not row:
            raise NotFound(f"device {device_id!r} not found")
        return Device.from_row(row)

    def list_devices(
        self,
        selector: Selector,
        cursor: str | None,
        limit: int,
        online: bool | None = None,
        revoked: bool | None = None,
    ) -> Page[Device]:
        """Devices matching the label selector (and flags), ordered by id."""
        where, selected = selector.to_sql(self.database.dialect, "labels")
        params: dict[str, Any] = dict(selected)
        sql = f"SELECT {PUBLIC_COLUMNS} FROM devices WHERE ({where})"  # noqa: S608
        if online is not None:
            sql += " AND online = :online"
            params["online"] = int(online)
        if revoked is not None:
            sql += " AND revoked = :revoked"
            params["revoked"] = int(revoked)
        return self.database.page_of(sql, params, "id", cursor, limit, Device.from_row)

    def ids_matching(self, selector: Selector, include_revoked: bool = False) -> list[str]:
        """Every matching device id (for the rollout controller's cohort expansion)."""
        where, params = selector.to_sql(self.database.dialect, "labels")
        sql = f"SELECT id FROM devices WHERE ({where})" + ("" if include_revoked else " AND revoked = 0")  # noqa: S608
        with self.database.read() as db:
            return [r["id"] for r in db.query(sql + " ORDER BY id", params)]

    def is_revoked(self, device_id: str) -> bool:
        """Whether the device is revoked (one primary-key read). Raises NotFound."""
        with self.database.read() as db:
            row = db.execute("SELECT revoked FROM devices WHERE id = :id", {"id": device_id}).fetchone()
        if row is None:
            raise NotFound(f"device {device_id!r} not found")
        return bool(row[0])

    def revoked_ids(self) -> frozenset[str]:
        """Every revoked device's id (one query; the ingest path's per-message filter caches it)."""
        with self.database.read() as db:
            return frozenset(r[0] for r in db.execute("SELECT id FROM devices WHERE revoked = 1"))

    def count(self) -> int:
        with self.database.read() as db:
            return int(db.scalar("SELECT count(*) FROM devices"))

    def set_labels(self, device_id: str, labels: dict[str, str], actor: str) -> Device:
        """Replace a device's labels. Raises NotFound, FleetInputError."""
        labels = validate_labels(labels)
        with self.database.tx() as db:
            before = self.get(device_id)
            db.execute("UPDATE devices SET labels = :labels WHERE id = :id", {"labels": dumps(labels),
                                                                              "id": device_id})
            after = self.get(device_id)
            self.audit.record(actor, "device.labels", f"devices/{device_id}",
                                    {"labels": before.labels}, {"labels": labels})
        return after

    def revoke(self, device_id: str, actor: str, reason: str = "") -> Device:
        """Revoke a device: it loses its broker credentials. Raises NotFound, Conflict (already)."""
        with self.database.tx() as db:
            before = self.get(device_id)
            if before.revoked:
                raise Conflict(f"device {device_id!r} is already revoked")
            db.execute("UPDATE devices SET revoked = 1, revoked_at = :at, online = 0 WHERE id = :id",
                       {"at": self.database.now(), "id": device_id})
            after = self.get(device_id)
            self.audit.record(actor, "device.revoke", f"devices/{device_id}",
                                    {"revoked": False}, {"revoked": True, "reason": reason})
        return after

    def record_reported_state(self, device_id: str, state: dict[str, Any], signed: bool = True) -> Device:
        """Fold a device's reported state (`agent.contract.protocol.ReportedState` as a dict) into
        its inventory row.

        `device_id` is the broker-authenticated id; a different `device_id` inside the payload is
        refused, never trusted. Non-empty `agent_version`, `architecture`, `runtimes` and
        `memory_mb` update their columns; `online` (default True; False from a Last Will) sets the
        flag; the whole document is kept. Labels a device reports are kept in the document only:
        labels are the fleet's to set. `signed`: verified as the device's own (`fleet.delivery.
        report_verify`; False only for an unsigned report a fleet in `optional` mode let in, which
        rollouts then ignore). Raises NotFound (unknown device), FleetInputError
        (revoked device, wrong id, bad types, too big).
        """
        if not isinstance(state, dict):
            raise FleetInputError("reported state must be a JSON object")
        claimed = state.get("device_id")
        if claimed is not None and claimed != device_id:
            raise FleetInputError(f"report from {device_id!r} claims to be from {claimed!r}")
        doc = dumps(state)
        if len(doc) > MAX_REPORTED_STATE_BYTES:
            raise FleetInputError(f"reported state of {device_id!r} exceeds {MAX_REPORTED_STATE_BYTES} bytes")
        online = state.get("online", True)
        if not isinstance(online, bool):
            raise FleetInputError(f"reported state of {device_id!r}: online must be a boolean")
        now = self.database.now()
        updates: dict[str, Any] = {"reported_state": doc, "last_seen": now, "online": int(online),
                                   "reported_signed": int(signed)}
        for key in ("agent_version", "architecture"):
            value = state.get(key)
            if value is not None and not isinstance(value, str):
                raise FleetInputError(f"reported state of {device_id!r}: {key} must be a string")
            if value:
                updates[key] = value
        memory = state.get("memory_mb")
        if memory is not None:
            if isinstance(memory, bool) or not isinstance(memory, int | float) or memory < 0:
                raise FleetInputError(f"reported state of {device_id!r}: memory_mb must be a number >= 0")
            updates["memory_mb"] = round(memory)
        if state.get("runtimes") is not None:
            rts = state["runtimes"]
            if not isinstance(rts, list) or not all(isinstance(r, str) for r in rts):
                raise FleetInputError(f"reported state of {device_id!r}: runtimes must be a list of str")
            if rts:
                updates["runtimes"] = dumps(rts)
        with self.database.tx() as db:
            current = self.get(device_id)
            if current.revoked:
                raise FleetInputError(f"device {device_id!r} is revoked; its report is ignored")
            sets = ", ".join(f"{k} = :{k}" for k in updates)  # keys: the fixed column names above
            db.execute(f"UPDATE devices SET {sets} WHERE id = :device_id",  # noqa: S608
                       {**updates, "device_id": device_id})
            return self.get(device_id)

    def on_reported(self, device_id: str, report: ReportedState, signed: bool = True) -> None:
        """Publisher callback (`Publisher.on_reported(store.devices.on_reported)`).

        Records the report; a refused one (unknown or revoked device, wrong id) is logged and
        dropped, because raising in the publisher's thread would help no one.
        """
        try:
            self.record_reported_state(device_id, report.model_dump(mode="json"), signed)
        except FleetInputError as exc:
            self.refused_reports += 1
            log_event(logger, "fleet.inventory.report_refused", logging.WARNING, device=device_id,
                      error=str(exc), refused=self.refused_reports)

    def mark_offline(self, device_id: str) -> None:
        """Record that the device went away (Last Will or timeout). Raises NotFound."""
        with self.database.tx() as db:
            self.get(device_id)
            db.execute("UPDATE devices SET online = 0 WHERE id = :id", {"id": device_id})

    def broker_credentials(self) -> list[tuple[str, str]]:
        """(username, password hash) of every password device that is not revoked, for the broker file.

        Certificate devices have no line: a password for them would be a second way in.
        """
        with self.database.read() as db:
            rows = db.query(
                "SELECT broker_username, broker_password_hash FROM devices WHERE revoked = 0 "
                "AND identity = 'password' ORDER BY broker_username"
            )
            return [(r["broker_username"], r["broker_password_hash"]) for r in rows]

    def revoked_certificates(self) -> list[tuple[str, str]]:
        """(certificate serial, revoked_at) of every revoked certificate device, for the CRL."""
        with self.database.read() as db:
            rows = db.query(
                "SELECT cert_serial, revoked_at FROM devices WHERE revoked = 1 AND cert_serial IS NOT NULL "
                "ORDER BY cert_serial"
            )
            return [(r["cert_serial"], r["revoked_at"]) for r in rows]

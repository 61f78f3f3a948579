"""Request and response bodies of the admin API (pydantic; extra fields are refused)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

T = TypeVar("T")
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
SemVer = Annotated[str, StringConstraints(
    pattern=r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")]
Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
TargetPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,254}$")]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=253)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
Note = Annotated[str, StringConstraints(max_length=1000)]
Scalar = str | int | float | bool | None
StageName = Literal["registered", "staging", "canary", "production", "archived"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Record(BaseModel):
    """A response read from a store record (a dataclass): fields are taken by attribute."""

    model_config = ConfigDict(from_attributes=True)


class PageOf(BaseModel, Generic[T]):
    """One page; pass `next_cursor` back as `cursor` for the next one (null at the end)."""

    items: list[T]
    next_cursor: str | None = None


# -- models ----------------------------------------------------------------------
class ModelCreate(_In):
    name: Name
    description: Annotated[str, StringConstraints(max_length=2000)] = ""


class ModelOut(_Record):
    name: str
    description: str
    created_at: str
    created_by: str


class Lineage(_In):
    """Where a model version came from: enough to reproduce or audit it."""

    training_code_ref: Annotated[str, StringConstraints(max_length=500)] | None = None
    dataset_ref: Annotated[str, StringConstraints(max_length=500)] | None = None
    dataset_digest: Digest | None = None
    hyperparameters: Annotated[dict[Annotated[str, StringConstraints(max_length=200)], Scalar],
                               Field(max_length=500)] = {}
    metrics: Annotated[dict[Annotated[str, StringConstraints(max_length=200)], float],
                       Field(max_length=500)] = {}
    source: Annotated[dict[Annotated[str, StringConstraints(max_length=200)], Scalar],
                      Field(max_length=100)] = {}


class VersionCreate(_In):
    version: SemVer
    artifact_digest: Digest
    runtime: Literal["onnx", "tflite"]
    lineage: Lineage = Lineage()
    bundle_target: TargetPath | None = None


class VersionOut(_Record):
    id: str
    model_name: str
    version: str
    artifact_digest: str
    bundle_target: str | None
    runtime: str
    lineage: dict[str, Any]
    stage: StageName
    created_at: str
    created_by: str


class StageChange(_In):
    stage: StageName
    note: Note = ""


class BundleTarget(_In):
    bundle_target: TargetPath


class StageHistoryOut(_Record):
    id: int
    version_id: str
    from_stage: str | None
    to_stage: str
    actor: str
    note: str
    at: str


class MlflowImport(_In):
    """Import an MLflow model directory that lies under the server's import directory.

    With `reference_data` (a `.npy` file there too) or `no_profile`, the bundle is built from the
    MLflow model and published, so the version is deployable at once; with neither, the version
    waits for a bundle whose model digest is MLflow's artifact (`models publish` attaches it).
    """

    path: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    model: Name
    version: SemVer
    reference_data: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None
    no_profile: bool = False


# -- devices ---------------------------------------------------------------------
class DeviceOut(_Record):
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
    identity: str = Field(description="How the device logs in to the broker: `password` or `cert`")
    cert_serial: str | None = Field(description="Serial (hex) of its client certificate (identity `cert`)")
    cert_fingerprint: str | None = Field(description="`sha256:<hex>` of its client certificate")
    cert_not_after: str | None = Field(description="When its client certificate expires (ISO 8601 UTC)")


class RevokeOut(DeviceOut):
    """The revoked device plus what the broker and publisher did about it (`fleet/devices/revocation.py`)."""

    broker_reloaded: bool
    broker_detail: str
    desired_cleared: bool
    desired_detail: str
    session_ended: bool = Field(description="A certificate device's open broker session was closed")
    session_detail: str


class LabelsIn(_In):
    labels: Labels


class RevokeIn(_In):
    reason: Note = ""


# -- enrollment ------------------------------------------------------------------
class TokenCreate(_In):
    labels: Labels = {}
    ttl_seconds: Annotated[int, Field(ge=60)] | None = None


class TokenOut(_Record):
    id: str
    labels: dict[str, str]
    created_by: str
    created_at: str
    expires_at: str
    used_at: str | None
    device_id: str | None


class TokenCreated(TokenOut):
    token: str | None = Field(description="The one-time token; shown only in the response that created it "
                              "(null in an idempotent replay: it is never stored).")
    secret_note: str | None = Field(default=None,
                                    description="Set in an idempotent replay: why `token` is null.")


class EnrollIn(_In):
    agent_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    architecture: Annotated[str, StringConstraints(max_length=64)] | None = None
    runtimes: Annotated[list[Annotated[str, StringConstraints(max_length=32)]], Field(max_length=16)] = []
    memory_mb: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    csr: Annotated[str, StringConstraints(max_length=16 * 1024)] | None = Field(default=None, description=(
        "PEM certificate signing request over a key made on the device: ask for a client certificate "
        "(CN = the assigned device id, whatever the CSR's subject says) instead of a broker password"))
    wrap_public_key: Annotated[str, StringConstraints(max_length=64)] | None = Field(default=None, description=(  # noqa: E501
        "base64 of the raw 32-byte X25519 public key sealed bundles' content keys are wrapped for "
        "(made on the device; see docs/trust.md, Bundle encryption)"))
    report_public_key: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description=(
        "Base64 of the raw 32-byte Ed25519 public key the device signs its reports with (private key "
        "kept on the device; docs/trust.md, *Signed device reports*)"))


class ReportKeyIn(_In):
    public_key: Annotated[str, StringConstraints(min_length=40, max_length=64)] = Field(description=(
        "Base64 of the device's raw 32-byte Ed25519 report key (`edgefleet agent report-key` prints it)"))


class ReportKeyOut(BaseModel):
    device_id: str
    public_key: str
    counters: dict[str, int] = Field(description="Highest accepted report counter per kind (0: none yet)")


class BrokerCredentials(BaseModel):
    url: str
    username: str
    password: str | None = Field(description="The device's broker password; null with a certificate")
    ca_pem: str | None = Field(default=None, description=(
        "CA certificate(s) (PEM) of the broker's server certificate, when the fleet is configured "
        "with one (`device_broker_ca_file`); null: the system's CAs"))
    client_id: str
    topic_prefix: str = Field(description=(
        "Topic root, the agent config's `topic_prefix`: the device's topics are "
        "`<topic_prefix>/v1/devices/<device_id>/...`"))


class DeviceCertificateOut(BaseModel):
    pem: str = Field(description="The device's client certificate (PEM)")
    ca_pem: str = Field(description="The fleet's device CA certificate (PEM) that issued it")
    serial: str = Field(description="Serial number, lower-case hex")
    fingerprint: str = Field(description="`sha256:<hex>` of the DER certificate")
    not_after: str = Field(description="Expiry, ISO 8601 UTC")


class EnrollOut(BaseModel):
    device_id: str
    labels: dict[str, str]
    broker: BrokerCredentials
    certificate: DeviceCertificateOut | None = Field(
        default=None, description="Present when the request carried a CSR")
    tuf_root: dict[str, Any] | None = Field(
        description="Trusted TUF root metadata; null if no repository yet.")


# -- rollouts --------------------------------------------------------------------
class RolloutCreate(_In):
    model_version_id: Annotated[str, StringConstraints(min_length=3, max_length=200)] = Field(
        description="`<model>:<version>`")
    selector: Annotated[str, StringConstraints(max_length=1024)] = Field(
        description="Kubernetes-style label selector for the cohort, e.g. `env=prod,region in (eu,us)`")
    strategy: Annotated[dict[Annotated[str, StringConstraints(max_length=100)], Any],
                        Field(max_length=50)] = {}
    thresholds: Annotated[dict[Annotated[str, StringConstraints(max_length=100)], float],
                          Field(max_length=50)] = {}
    allow_model_change: bool = Field(default=False, description=(
        "Allow moving devices that serve another model, or another input/output schema, to this "
        "version (refused with 409 otherwise)."))


class RolloutOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # takes the fleet.rollouts.store records

    id: str
    model_version_id: str
    selector: str
    strategy: dict[str, Any]
    thresholds: dict[str, float]
    state: str = Field(description="Written by the rollout controller; `pending` until one acts.")
    desired: Literal["run", "pause", "abort"] = Field(description="The operator's recorded intent.")
    stage: int
    created_at: str
    updated_at: str
    created_by: str
    history: list[dict[str, Any]]
    warnings: list[str] = Field(default=[], description=(
        "What the operator should know, e.g. `cohort matches no device` (set on create, read "
        "and status; empty in lists)."))


class RolloutAction(_In):
    note: Note = ""


class RolloutStatus(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # takes the fleet.rollouts.store records

    id: str
    state: str
    desired: str
    stage: int
    updated_at: str
    devices_total: int
    devices_by_status: dict[str, int] = Field(description=(
        "Devices per status; `held` (short of disk, memory or CPU: the device holds the update) and "
        "`waiting_for_window` (outside its maintenance window) are apart from the failures, and so "
        "is `window_missed` (no window opened within `window_timeout_s`)"))
    warnings: list[str] = Field(default=[], description="As in the rollout, e.g. `cohort matches no device`.")
    baking_until: str | None = Field(default=None, description="While the current stage bakes (every "
                                     "device final, `bake_s` not over): when the bake ends, ISO-8601 UTC")
    approval_due: str | None = Field(default=None, description=(
        "While the rollout is `awaiting_approval`: when the approval timeout pauses or aborts it "
        "(`strategy.approval.on_timeout`), ISO-8601 UTC; approve with POST .../approve"))


class RolloutDeviceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # takes the fleet.rollouts.store records

    rollout_id: str
    device_id: str
    stage: int
    status: str
    updated_at: str


# -- API keys, audit ---------------------------------------------------------------
class ApiKeyCreate(_In):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"\S")]
    role: Literal["admin", "operator", "viewer"]


class ApiKeyOut(_Record):
    id: str
    name: str
    role: str
    created_at: str
    created_by: str
    revoked: bool
    revoked_at: str | None


class ApiKeyCreated(ApiKeyOut):
    key: str | None = Field(description="The API key; shown only in the response that created it "
                            "(null in an idempotent replay: it is never stored).")
    secret_note: str | None = Field(default=None,
                                    description="Set in an idempotent replay: why `key` is null.")


class AuditOut(_Record):
    id: int
    at: str
    actor: str
    action: str
    resource: str
    before: Any
    after: Any


class WhoAmI(BaseModel):
    key_id: str
    name: str
    role: str

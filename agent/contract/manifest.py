"""The bundle manifest: everything a device needs to know about a model before running it.

Validated with pydantic (strict, extra fields forbidden) because it arrives from outside;
`docs/manifest.schema.json` is generated from these models (`python -m agent.contract.manifest`).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ManifestError

MANIFEST_SCHEMA_VERSION: Literal[1] = 1
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DType = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
Runtime = Literal["onnx", "tflite"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named input or output: dtype and shape; `None` marks a dynamic axis (axis 0 = batch)."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    dtype: DType
    shape: list[int | None] = Field(min_length=1, max_length=8)

    @field_validator("shape")
    @classmethod
    def _dims_positive(cls, shape: list[int | None]) -> list[int | None]:
        if any(d is not None and d <= 0 for d in shape):
            raise ValueError("fixed dimensions must be positive")
        return shape


class Quantization(_Strict):
    """How the model was quantized and what it cost against the float model."""

    scheme: Literal["none", "int8-dynamic", "int8-static", "tflite-int8", "tflite-float"] = "none"
    calibration: dict[str, Any] = Field(default_factory=dict)
    accuracy_delta: float | None = None
    agreement: float | None = Field(default=None, ge=0.0, le=1.0)


class FeatureProfile(_Strict):
    """Reference binning for one feature or output: numeric bin edges or a vocabulary."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    kind: Literal["numeric", "categorical"]
    edges: list[float] = Field(default_factory=list, max_length=1025)
    vocabulary: list[str] = Field(default_factory=list, max_length=4096)
    mean: float | None = None
    std: float | None = None
    reference_counts: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureProfile:
        if self.kind == "numeric":
            if len(self.edges) < 2 or any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError(f"feature {self.name!r}: numeric edges must be >= 2 and non-decreasing")
        elif not self.vocabulary:
            raise ValueError(f"feature {self.name!r}: categorical feature needs a vocabulary")
        return self


class ReferenceProfile(_Strict):
    """Per-feature and per-output binning the agent's telemetry sketches are keyed to."""

    input_name: str | None = None
    features: list[FeatureProfile] = Field(default_factory=list, max_length=4096)
    outputs: list[FeatureProfile] = Field(default_factory=list, max_length=256)
    sample_count: int = 0


class GoldenVectors(_Strict):
    """Inputs with expected outputs, checked after activation within a tolerance."""

    inputs: dict[str, list[Any]] = Field(default_factory=dict)
    expected: dict[str, list[Any]] = Field(default_factory=dict)
    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)
    label_agreement_min: float | None = Field(default=None, ge=0.0, le=1.0)


class HealthPolicy(_Strict):
    """What probation checks after activation, and how long it lasts."""

    latency_budget_ms: float = Field(default=50.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    probation_requests: int = Field(default=100, ge=0)
    probation_seconds: float = Field(default=30.0, ge=0)
    max_memory_mb: float | None = Field(default=None, gt=0)
    inference_timeout_s: float = Field(default=2.0, gt=0)


class Lineage(_Strict):
    """Where the model came from (training code, data, hyperparameters, metrics)."""

    training_code_ref: str = ""
    dataset_ref: str = ""
    dataset_digest: str = ""
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class Compatibility(_Strict):
    """What a device needs to run the bundle."""

    min_agent_version: str = "0.1.0"
    runtimes: list[Runtime] = Field(default_factory=list)
    architectures: list[str] = Field(default_factory=list)
    min_memory_mb: int = Field(default=0, ge=0)

    @field_validator("min_agent_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError("min_agent_version must be a semantic version")
        return v


class Manifest(_Strict):
    """The signed description of one model bundle (see docs/bundle.md)."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str
    version: str
    runtime: Runtime
    model_file: str = Field(pattern=r"^model\.(onnx|tflite)$")
    model_digest: str
    model_size: int = Field(ge=1)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    quantization: Quantization = Field(default_factory=Quantization)
    reference_profile: ReferenceProfile = Field(default_factory=ReferenceProfile)
    golden: GoldenVectors = Field(default_factory=GoldenVectors)
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    lineage: Lineage = Field(default_factory=Lineage)
    compatibility: Compatibility = Field(default_factory=Compatibility)
    created_at: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("name must match [a-z0-9][a-z0-9._-]{0,63}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError("version must be a semantic version such as 1.2.3")
        return v

    @field_validator("model_digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if not DIGEST_RE.match(v):
            raise ValueError("model_digest must be 'sha256:' + 64 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _runtime_matches_file(self) -> Manifest:
        if not self.model_file.endswith("." + self.runtime):
            raise ValueError(f"model_file {self.model_file!r} does not match runtime {self.runtime!r}")
        return self

    @property
    def bundle_id(self) -> str:
        """`name-version`, the bundle's identity in slots, events and the repository."""
        return f"{self.name}-{self.version}"

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, compact) so the same manifest always hashes the same."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(data: bytes | str | dict[str, Any]) -> Manifest:
    """Validate untrusted manifest bytes/JSON/dict. Raises `ManifestError` with every problem."""
    try:
        if isinstance(data, dict):
            return Manifest.model_validate(data)
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ManifestError(f"invalid manifest: {problems}") from None


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key for semantic versions (a pre-release sorts before its release)."""
    m = SEMVER_RE.match(version)
    if not m:
        raise ManifestError(f"not a semantic version: {version!r}")
    pre = version.split("+", 1)[0].partition("-")[2]
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (written to docs/manifest.schema.json)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgefleet.dev/schemas/manifest-v1.json"
    return schema


if __name__ == "__main__":  # pragma: no cover - regenerates the docs file
    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")

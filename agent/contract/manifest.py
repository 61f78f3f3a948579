"""The bundle manifest: everything a device needs to know about a model before running it.

Validated strictly (`agent.contract.strict`: unknown fields refused, constraints checked)
because it arrives from outside;
`docs/manifest.schema.json` is generated from these models (`python -m agent.contract.manifest`).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any, Literal

from agent.contract.strict import Meta, StrictStruct, ValidationError, describe, field
from agent.errors import ManifestError

MANIFEST_SCHEMA_VERSION: Literal[1] = 1
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DType = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
Runtime = Literal["onnx", "tflite"]


_Name = Annotated[str, Meta(min_length=1, max_length=128)]


def _fullmatch(rx: re.Pattern[str], value: str, message: str) -> None:
    if not rx.fullmatch(value):
        raise ValueError(message)


class TensorSpec(StrictStruct, frozen=True, kw_only=True):
    """One named input or output: dtype and shape; `None` marks a dynamic axis (axis 0 = batch)."""

    name: _Name
    dtype: DType
    shape: Annotated[list[int | None], Meta(min_length=1, max_length=8)]

    def _check(self) -> None:
        if any(d is not None and d <= 0 for d in self.shape):
            raise ValueError("fixed dimensions must be positive")


class Quantization(StrictStruct, frozen=True, kw_only=True):
    """How the model was quantized and what it cost against the float model."""

    scheme: Literal["none", "int8-dynamic", "int8-static", "tflite-int8", "tflite-float"] = "none"
    calibration: dict[str, Any] = field(default_factory=dict)
    accuracy_delta: float | None = None
    agreement: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


class FeatureProfile(StrictStruct, frozen=True, kw_only=True):
    """Reference binning for one feature or output: numeric bin edges or a vocabulary."""

    name: _Name
    kind: Literal["numeric", "categorical"]
    edges: Annotated[list[float], Meta(max_length=1025)] = field(default_factory=list)
    vocabulary: Annotated[list[str], Meta(max_length=4096)] = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    reference_counts: list[int] = field(default_factory=list)

    def _check(self) -> None:
        if self.kind == "numeric":
            if len(self.edges) < 2 or any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError(f"feature {self.name!r}: numeric edges must be >= 2 and non-decreasing")
        elif not self.vocabulary:
            raise ValueError(f"feature {self.name!r}: categorical feature needs a vocabulary")


CONFIDENCE_BINS = 20  # equal-width bins of calibrated top-class confidence over [0, 1]
_Prob = Annotated[float, Meta(ge=0.0, le=1.0)]


class Calibration(StrictStruct, frozen=True, kw_only=True):
    """Map from the model's raw top-class confidence to the probability that it is right.

    Fitted by the bundle pipeline on held-out labelled data (`fleet.registry.calibration`):
    equal-mass bins of raw confidence, their accuracies made non-decreasing (isotonic, pool
    adjacent violators), linear between the knots `(knots_x[i], knots_y[i])` and flat beyond.
    `bin_se[b]` is the standard error of the holdout accuracy among rows whose *calibrated*
    confidence falls in fixed bin `b` (of `CONFIDENCE_BINS`); the fleet's error band uses it.
    """

    knots_x: Annotated[list[_Prob], Meta(min_length=1, max_length=64)]
    knots_y: Annotated[list[_Prob], Meta(min_length=1, max_length=64)]
    bin_se: Annotated[list[Annotated[float, Meta(ge=0.0, le=1.0)]],
                      Meta(min_length=CONFIDENCE_BINS, max_length=CONFIDENCE_BINS)]
    holdout_rows: Annotated[int, Meta(ge=1)]
    holdout_accuracy: _Prob

    def _check(self) -> None:
        if len(self.knots_x) != len(self.knots_y):
            raise ValueError("calibration: knots_x and knots_y differ in length")
        if any(b < a for a, b in zip(self.knots_x, self.knots_x[1:], strict=False)) or any(
            b < a for a, b in zip(self.knots_y, self.knots_y[1:], strict=False)
        ):
            raise ValueError("calibration: knots must be non-decreasing")


class PerformanceSpec(StrictStruct, frozen=True, kw_only=True):
    """What the model predicts, so the agent can match labels and sketch its confidence.

    `classes` is the number of output columns of a classifier (labels are class indices
    0..classes-1), 0 for a regressor (labels are numbers compared with output column 0).
    `scores` says whether a classifier's outputs are probabilities or logits (softmaxed).
    """

    task: Literal["classification", "regression"]
    classes: Annotated[int, Meta(ge=0, le=256)] = 0
    scores: Literal["probabilities", "logits"] = "probabilities"
    calibration: Calibration | None = None

    def _check(self) -> None:
        if (self.task == "classification") != (self.classes >= 2):
            raise ValueError("performance: a classifier needs classes >= 2, a regressor classes = 0")
        if self.calibration is not None and self.task != "classification":
            raise ValueError("performance: calibration applies to classifiers only")


class ReferenceProfile(StrictStruct, frozen=True, kw_only=True):
    """Per-feature and per-output binning the agent's telemetry sketches are keyed to.

    `performance` (optional, absent in bundles built before it existed) says how labels and
    confidence are sketched; it is left out of the profile digest when absent, so reports of
    old bundles keep their `profile_id`.
    """

    input_name: str | None = None
    features: Annotated[list[FeatureProfile], Meta(max_length=4096)] = field(default_factory=list)
    outputs: Annotated[list[FeatureProfile], Meta(max_length=256)] = field(default_factory=list)
    sample_count: int = 0
    performance: PerformanceSpec | None = None


class GoldenVectors(StrictStruct, frozen=True, kw_only=True):
    """Inputs with expected outputs, checked after activation within a tolerance."""

    inputs: dict[str, list[Any]] = field(default_factory=dict)
    expected: dict[str, list[Any]] = field(default_factory=dict)
    rtol: Annotated[float, Meta(ge=0)] = 1e-3
    atol: Annotated[float, Meta(ge=0)] = 1e-4
    label_agreement_min: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


class HealthPolicy(StrictStruct, frozen=True, kw_only=True):
    """What probation checks after activation, and how long it lasts.

    A commit needs evidence: `min_successful_requests` client requests the new model answered
    (a device whose clients all fail, or that sees no traffic at all, proves nothing), unless
    `traffic` is "none": the device may see no traffic in probation and the golden vectors
    alone justify the commit (such a manifest must carry golden vectors).
    """

    latency_budget_ms: Annotated[float, Meta(gt=0)] = 50.0
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.01
    probation_requests: Annotated[int, Meta(ge=0)] = 100
    probation_seconds: Annotated[float, Meta(ge=0)] = 30.0
    max_memory_mb: Annotated[float, Meta(gt=0)] | None = None
    inference_timeout_s: Annotated[float, Meta(gt=0)] = 2.0
    min_successful_requests: Annotated[
        int,
        Meta(ge=1, description="client requests the new model must answer before a commit "
                               "(rejected or failed ones do not count); ignored when traffic is 'none'"),
    ] = 10
    traffic: Annotated[
        Literal["required", "none"],
        Meta(description="'none': no traffic is needed in probation, the golden vectors alone "
                         "justify the commit (needs golden vectors)"),
    ] = "required"


class Lineage(StrictStruct, frozen=True, kw_only=True):
    """Where the model came from (training code, data, hyperparameters, metrics)."""

    training_code_ref: str = ""
    dataset_ref: str = ""
    dataset_digest: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Compatibility(StrictStruct, frozen=True, kw_only=True):
    """What a device needs to run the bundle."""

    min_agent_version: str = "0.1.0"
    runtimes: list[Runtime] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    min_memory_mb: Annotated[int, Meta(ge=0)] = 0

    def _check(self) -> None:
        _fullmatch(SEMVER_RE, self.min_agent_version, "min_agent_version must be a semantic version")


class Manifest(StrictStruct, frozen=True, kw_only=True):
    """The signed description of one model bundle (see docs/bundle.md)."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str
    version: str
    runtime: Runtime
    model_file: Annotated[str, Meta(pattern=r"^model\.(onnx|tflite)$")]
    model_digest: str
    model_size: Annotated[int, Meta(ge=1)]
    inputs: Annotated[list[TensorSpec], Meta(min_length=1, max_length=64)]
    outputs: Annotated[list[TensorSpec], Meta(min_length=1, max_length=64)]
    quantization: Quantization = field(default_factory=Quantization)
    reference_profile: ReferenceProfile = field(default_factory=ReferenceProfile)
    golden: GoldenVectors = field(default_factory=GoldenVectors)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    lineage: Lineage = field(default_factory=Lineage)
    compatibility: Compatibility = field(default_factory=Compatibility)
    created_at: str = ""

    def _check(self) -> None:
        _fullmatch(NAME_RE, self.name, "name must match [a-z0-9][a-z0-9._-]{0,63}")
        _fullmatch(SEMVER_RE, self.version, "version must be a semantic version such as 1.2.3")
        _fullmatch(DIGEST_RE, self.model_digest, "model_digest must be 'sha256:' + 64 lowercase hex digits")
        if self.model_file != "model." + self.runtime:
            raise ValueError(f"model_file {self.model_file!r} does not match runtime {self.runtime!r}")
        if self.health.traffic == "none" and not self.golden.inputs:
            raise ValueError("health.traffic 'none' needs golden vectors: nothing else would be checked")

    @property
    def bundle_id(self) -> str:
        """`name-version`, the bundle's identity in slots, events and the repository."""
        return f"{self.name}-{self.version}"

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, compact) so the same manifest always hashes the same."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(data: bytes | str | dict[str, Any]) -> Manifest:
    """Validate untrusted manifest bytes/JSON/dict. Raises `ManifestError` naming the first problem."""
    try:
        if isinstance(data, dict):
            return Manifest.model_validate(data)
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(f"invalid manifest: {describe(exc)}") from None


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

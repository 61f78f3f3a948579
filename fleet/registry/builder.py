"""Build a bundle from a trained model: detect, describe, (quantize), profile, sign-ready.

The builder turns an operator's model file plus `BundleMetadata` into a bundle whose manifest
says everything a device needs: the runtime (detected from the bytes, not the file name), the
tensor schema read from the model itself, golden vectors produced by actually running the
model that ships (onnxruntime or LiteRT), and the reference profile the drift telemetry is keyed
to. Writing goes through `agent.contract.bundle.write_bundle`, so the agent reads exactly what
the fleet wrote.

Running the model is `fleet.registry.model_runner`'s job and int8 quantization with its gate is
`fleet.registry.quantize`'s; both sit below this module (neither imports the builder).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.contract.bundle import DEFAULT_LIMITS, write_bundle
from agent.contract.manifest import (
    Compatibility,
    GoldenVectors,
    HealthPolicy,
    Lineage,
    Manifest,
    Quantization,
    TensorSpec,
    parse_manifest,
)
from agent.errors import ManifestError, MisuseError
from agent.logs import log_event
from fleet.errors import FleetInputError, FleetMisuseError, FleetResourceError
from fleet.registry.calibration import performance_spec
from fleet.registry.model_runner import Runner, describe_model, make_runner
from fleet.registry.profile import compute_reference_profile
from fleet.registry.quantize import QuantizationGate, QuantizeMode, quantize_onnx

log = logging.getLogger("edgefleet.fleet.bundle_builder")

Progress = Callable[[str, float], None]
"""`progress(step, fraction_done)`: called at the start of each step and with 1.0 at the end."""


class BundleMetadata(BaseModel):
    """What the operator says about a model; everything else is derived from the model itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    lineage: Lineage = Field(default_factory=Lineage)
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    compatibility: Compatibility = Field(default_factory=Compatibility)
    rtol: float = Field(default=1e-3, ge=0, description="golden-vector relative tolerance")
    atol: float = Field(default=1e-4, ge=0, description="golden-vector absolute tolerance")
    label_agreement_min: float | None = Field(default=None, ge=0.0, le=1.0)
    feature_names: list[str] = Field(default_factory=list, max_length=4096)
    output_names: list[str] = Field(default_factory=list, max_length=256)
    categorical: dict[str, list[str]] = Field(default_factory=dict)
    bins: int = Field(default=100, ge=1, le=1024)
    golden_count: int = Field(default=16, ge=1, le=1024)
    seed: int = 0
    quantize: QuantizeMode = "none"
    quantization_gate: QuantizationGate = Field(default_factory=QuantizationGate)

    @classmethod
    def from_json_file(cls, path: Path) -> BundleMetadata:
        """Load metadata JSON. Raises `FleetInputError` naming every problem."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise FleetInputError(f"cannot read metadata {path}: {exc.strerror}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
            )
            raise FleetInputError(f"invalid bundle metadata {path}: {problems}") from None


PROFILE_BATCH_ROWS = 4096


def _concrete(shape: list[int | None], batch: int) -> list[int]:
    return [batch if i == 0 and d is None else (d if d is not None else 1) for i, d in enumerate(shape)]


def golden_feeds(
    inputs: list[TensorSpec], count: int, seed: int, reference: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Seeded golden inputs: `count` rows of the reference data, else seeded normal values."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if reference is not None and len(inputs) == 1:
            rows = rng.choice(reference.shape[0], size=min(count, reference.shape[0]), replace=False)
            feeds[spec.name] = np.asarray(reference[np.sort(rows)]).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(_concrete(spec.shape, count)) < 0.5
        else:
            feeds[spec.name] = rng.standard_normal(_concrete(spec.shape, count)).astype(spec.dtype)
    return feeds


def _profile(
    meta: BundleMetadata,
    runner: Runner,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    reference: np.ndarray,
    report: Progress,
) -> Any:
    if len(inputs) != 1 or reference.ndim != 2:
        raise FleetInputError("reference data must be a 2-D array for a single-input model")
    names = meta.feature_names or [f"f{i}" for i in range(reference.shape[1])]
    if len(names) != reference.shape[1]:
        raise FleetInputError(f"{len(names)} feature_names for {reference.shape[1]} reference columns")
    chunks = []
    for start in range(0, reference.shape[0], PROFILE_BATCH_ROWS):  # bounded memory per run
        report("running reference data", 0.6 + 0.2 * start / reference.shape[0])
        batch = reference[start : start + PROFILE_BATCH_ROWS].astype(inputs[0].dtype)
        chunks.append(runner({inputs[0].name: batch})[outputs[0].name])
    out = np.concatenate(chunks)
    out2 = out.reshape(out.shape[0], -1)
    out_names = meta.output_names or [
        outputs[0].name if out2.shape[1] == 1 else f"{outputs[0].name}_{i}" for i in range(out2.shape[1])
    ]
    unknown = sorted(set(meta.categorical) - set(names) - set(out_names))
    if unknown:
        raise FleetInputError(f"categorical names {unknown} are neither features nor outputs")
    report("computing reference profile", 0.8)
    return compute_reference_profile(
        reference,
        names,
        outputs=out2,
        output_names=out_names,
        bins=meta.bins,
        categorical=dict(meta.categorical),
        input_name=inputs[0].name,
    )


def build_bundle(
    model_path: Path,
    metadata: BundleMetadata,
    out: Path,
    *,
    reference_data: np.ndarray | None = None,
    golden_inputs: np.ndarray | None = None,
    progress: Progress | None = None,
    no_profile: bool = False,
    holdout_data: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
) -> Path:
    """Describe, optionally quantize, run, profile and write the bundle `out`.

    `holdout_data` (held-out rows, never the training data) with `holdout_labels` (class
    indices) fits the calibration map of a classifier's top-class confidence that the fleet
    estimates accuracy from without labels (`fleet.registry.calibration`); it goes into the
    reference profile's `performance` spec, so it needs `reference_data` too.

    Without `reference_data` the build is refused unless `no_profile` says so: the bundle then
    has no reference profile (drift monitoring does nothing for it) and cannot be quantized (a
    gate on random rows proves nothing about real inputs).

    Raises `FleetInputError` (unreadable/invalid model or data, bad metadata),
    `fleet.errors.GateFailed` (quantized model too far from the float one, figures attached),
    `FleetMisuseError` (the assembled bundle would be invalid) or `FleetResourceError` (the
    bundle file cannot be written, e.g. a full disk).
    """
    report = progress or (lambda step, frac: None)
    report("reading model", 0.0)
    try:
        model = Path(model_path).read_bytes()
    except OSError as exc:
        raise FleetInputError(f"cannot read model {model_path}: {exc.strerror}") from None
    if len(model) > DEFAULT_LIMITS.max_model_bytes:
        raise FleetInputError(f"model is {len(model)} bytes, over {DEFAULT_LIMITS.max_model_bytes}")
    report("detecting runtime and schema", 0.1)
    runtime, inputs, outputs = describe_model(model)
    reference = None if reference_data is None else np.asarray(reference_data)
    if reference is not None and not (
        np.issubdtype(reference.dtype, np.number) or np.issubdtype(reference.dtype, np.bool_)
    ):
        raise FleetInputError("reference data must be numeric (categorical columns as integer codes)")
    quantization = Quantization()
    if metadata.quantize != "none":
        if runtime != "onnx":
            raise FleetInputError("int8 quantization is available for ONNX models only")
        report(f"quantizing ({metadata.quantize})", 0.2)
        if reference is None:
            raise FleetInputError(f"{metadata.quantize} quantization needs reference data "
                                  "(--reference-data): its gate compares int8 and float outputs on real rows")
        model, quantization = quantize_onnx(model, inputs, outputs, metadata.quantize,
                                            metadata.quantization_gate, metadata.seed, reference)
    if reference is None and not no_profile:
        raise FleetInputError("no reference data: pass --reference-data (reference profile for drift, golden "
                              "inputs, quantization gate), or --no-profile to build without drift monitoring")
    report("running golden vectors", 0.5)
    if golden_inputs is not None:
        if len(inputs) != 1:
            raise FleetInputError("--golden-inputs works for single-input models only")
        feeds = {inputs[0].name: np.asarray(golden_inputs).astype(inputs[0].dtype)}
    else:
        feeds = golden_feeds(inputs, metadata.golden_count, metadata.seed, reference)
    runner = make_runner(model, runtime)
    expected = runner(feeds)
    profile = None
    if reference is not None:
        profile = _profile(metadata, runner, inputs, outputs, reference, report)
    if holdout_data is not None:
        if profile is None or len(inputs) != 1:
            raise FleetInputError("--holdout-data needs --reference-data and a single-input model")
        report("calibrating confidence on holdout data", 0.85)
        hold = np.asarray(holdout_data)
        name, out_name, dtype = inputs[0].name, outputs[0].name, inputs[0].dtype
        chunks = [runner({name: hold[i : i + PROFILE_BATCH_ROWS].astype(dtype)})[out_name]
                  for i in range(0, hold.shape[0], PROFILE_BATCH_ROWS)]
        spec = performance_spec(np.concatenate(chunks), holdout_labels)
        profile = profile.model_copy(update={"performance": spec})
    report("writing bundle", 0.9)
    fields: dict[str, Any] = {
        "name": metadata.name,
        "version": metadata.version,
        "runtime": runtime,
        "model_file": f"model.{runtime}",
        "model_digest": "sha256:" + hashlib.sha256(model).hexdigest(),
        "model_size": len(model),
        "inputs": [s.model_dump() for s in inputs],
        "outputs": [s.model_dump() for s in outputs],
        "quantization": quantization.model_dump(),
        "golden": GoldenVectors(
            inputs={k: v.tolist() for k, v in feeds.items()},
            expected={k: v.tolist() for k, v in expected.items()},
            rtol=metadata.rtol,
            atol=metadata.atol,
            label_agreement_min=metadata.label_agreement_min,
        ).model_dump(),
        "health": metadata.health.model_dump(),
        "lineage": metadata.lineage.model_dump(),
        "compatibility": metadata.compatibility.model_copy(
            update={"runtimes": metadata.compatibility.runtimes or [runtime]}
        ).model_dump(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if profile is not None:
        fields["reference_profile"] = profile.model_dump()
    try:
        manifest: Manifest = parse_manifest(json.loads(json.dumps(fields)))
    except ManifestError as exc:
        raise FleetInputError(f"metadata does not make a valid manifest: {exc}") from None
    try:
        path = write_bundle(manifest, model, Path(out))
    except MisuseError as exc:
        raise FleetMisuseError(f"cannot write bundle {out}: {exc}") from exc
    except OSError as exc:
        raise FleetResourceError(f"cannot write bundle {out}: {exc}") from exc
    report("done", 1.0)
    log_event(
        log,
        "bundle.built",
        bundle_id=manifest.bundle_id,
        runtime=runtime,
        path=str(path),
        quantization=quantization.scheme,
    )
    return path

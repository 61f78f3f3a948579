"""`edgefleet bundle`: build a bundle from a model, inspect (fully verify) one, print the schema."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from agent.contract.bundle import BundleLimits, bundle_digest, extract_bundle, read_manifest
from agent.contract.manifest import Manifest, json_schema
from agent.errors import EdgefleetError
from fleet.errors import GateFailed


@click.group(name="bundle", context_settings={"help_option_names": ["-h", "--help"]})
def group() -> None:
    """Build and inspect model bundles (manifest + model in one verified tar)."""


def _load_npy(path: Path | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load {what} {path}: {exc}") from None


@group.command("build")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--metadata",
    "metadata_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="BundleMetadata JSON (name, version, lineage, health, ...).",
)
@click.option(
    "--reference-data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Reference rows (.npy, rows x features): profile, golden inputs, calibration.",
)
@click.option(
    "--no-profile",
    is_flag=True,
    help="Build without --reference-data: no reference profile, so drift monitoring is OFF for this bundle.",
)
@click.option(
    "--golden-inputs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Golden input rows (.npy); default: seeded rows of the reference data.",
)
@click.option(
    "--holdout-data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Held-out rows (.npy) with --holdout-labels: fits the confidence calibration map "
         "the fleet estimates accuracy from without labels (classifiers).",
)
@click.option(
    "--holdout-labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Class indices (.npy, one per --holdout-data row).",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "dynamic", "static"]),
    default=None,
    help="Int8 quantization (ONNX); overrides the metadata's `quantize`.",
)
@click.option(
    "--output-kind",
    type=click.Choice(["auto", "probabilities", "logits", "regression"]),
    default=None,
    help="What the model outputs, for the int8 gate's limits (default: the metadata's, else detected).",
)
@click.option(
    "--allow-larger-int8",
    is_flag=True,
    help="Keep an int8 model even when it is larger than the float one (refused by default).",
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Bundle file to write (.efb).",
)
def build_command(
    model: Path,
    metadata_path: Path,
    reference_data: Path | None,
    no_profile: bool,
    golden_inputs: Path | None,
    holdout_data: Path | None,
    holdout_labels: Path | None,
    quantize: str | None,
    output_kind: str | None,
    allow_larger_int8: bool,
    out: Path,
) -> None:
    """Build a bundle from MODEL (ONNX or TFLite, detected from the bytes).

    Refused without --reference-data unless --no-profile is given (then loudly): a bundle without
    a reference profile is invisible to drift monitoring, which must not happen by omission.
    """
    if no_profile and reference_data is not None:
        raise click.UsageError("--no-profile and --reference-data exclude each other")
    if (holdout_data is None) != (holdout_labels is None):
        raise click.UsageError("--holdout-data and --holdout-labels go together")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fleet.registry.builder import (  # lazy: pydantic, onnx: `build` only
        BundleMetadata,
        QuantizationGate,
        build_bundle,
    )

    try:
        meta = BundleMetadata.from_json_file(metadata_path)
        if quantize is not None:
            meta = meta.model_copy(update={"quantize": quantize})
        gate: dict[str, Any] = {"output_kind": output_kind} if output_kind else {}
        if allow_larger_int8:
            gate["allow_larger"] = True
        if gate:
            merged = QuantizationGate.model_validate({**meta.quantization_gate.model_dump(), **gate})
            meta = meta.model_copy(update={"quantization_gate": merged})
        ref = _load_npy(reference_data, "reference data")
        golden = _load_npy(golden_inputs, "golden inputs")
        hold = _load_npy(holdout_data, "holdout data")
        hold_labels = _load_npy(holdout_labels, "holdout labels")
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True
        ) as bar:
            task = bar.add_task("building", total=1.0)

            def progress(step: str, fraction: float) -> None:
                bar.update(task, description=step, completed=fraction)

            path = build_bundle(model, meta, out, reference_data=ref, golden_inputs=golden, progress=progress,
                                no_profile=no_profile, holdout_data=hold, holdout_labels=hold_labels)
    except GateFailed as exc:
        figures = ", ".join(f"{k}={v:.4g}" for k, v in sorted(exc.figures.items()))
        raise click.ClickException(f"{exc.reason} ({figures})") from None
    except EdgefleetError as exc:  # the fleet's errors and the agent's (bundle writing)
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path} ({path.stat().st_size} bytes, sha256 {bundle_digest(path)})")
    calibration = read_manifest(path).quantization.calibration
    if calibration:
        figures = ", ".join(f"{k}={v:.4g}" for k, v in sorted(calibration.items()) if isinstance(v, float))
        click.echo(f"int8 gate ({calibration.get('output_kind')} output): {figures}")
    for warning in calibration.get("warnings", []):
        click.secho(f"WARNING: {warning}", err=True, fg="yellow", bold=True)
    if no_profile:
        click.secho(f"WARNING: {path.name} has no reference profile (--no-profile): drift monitoring is OFF "
                    "for this bundle", err=True, fg="red", bold=True)


def _summary(manifest: Manifest, sha256: str, size: int) -> dict[str, Any]:
    return {
        "bundle_id": manifest.bundle_id,
        "name": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "model_file": manifest.model_file,
        "model_digest": manifest.model_digest,
        "model_size": manifest.model_size,
        "bundle_sha256": sha256,
        "bundle_size": size,
        "inputs": [s.model_dump() for s in manifest.inputs],
        "outputs": [s.model_dump() for s in manifest.outputs],
        "quantization": manifest.quantization.model_dump(),
        "health": manifest.health.model_dump(),
        "lineage": manifest.lineage.model_dump(),
        "golden_vectors": len(next(iter(manifest.golden.inputs.values()), [])),
        "profiled_features": len(manifest.reference_profile.features),
        "performance": None if manifest.reference_profile.performance is None
        else manifest.reference_profile.performance.model_dump(),
        "created_at": manifest.created_at,
    }


def _tensors(specs: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{s['name']}:{s['dtype']}{['?' if d is None else d for d in s['shape']]}" for s in specs
    )


@group.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the summary, the whole `manifest` and its `reference_profile` (feed it to "
              "`telemetry drift --profile -`).")
def inspect_command(bundle: Path, as_json: bool) -> None:
    """Fully verify BUNDLE (safe extraction with limits, model digest) and summarise it.

    `--json` carries the verified manifest and its reference profile, so drift can be computed
    against exactly what the devices were given:
    `edgefleet bundle inspect B.efb --json | edgefleet telemetry drift --profile - ...`.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-inspect-") as tmp:
            done = extract_bundle(bundle, Path(tmp) / "bundle", BundleLimits(), durable=False)
    except EdgefleetError as exc:
        click.echo(f"error: invalid bundle {bundle}: {exc}", err=True)
        raise SystemExit(1) from None
    summary = _summary(done.manifest, done.bundle_sha256, done.bundle_size)
    if as_json:
        manifest = done.manifest.model_dump(mode="json")
        doc = {**summary, "manifest": manifest, "reference_profile": manifest["reference_profile"]}
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    q = summary["quantization"]
    lines = [
        f"bundle        {summary['bundle_id']}  (verified)",
        f"runtime       {summary['runtime']}  {summary['model_file']}  {summary['model_size']} bytes",
        f"model digest  {summary['model_digest']}",
        f"bundle sha256 {summary['bundle_sha256']}  ({summary['bundle_size']} bytes)",
        f"inputs        {_tensors(summary['inputs'])}",
        f"outputs       {_tensors(summary['outputs'])}",
        f"quantization  {q['scheme']}"
        + (f"  agreement={q['agreement']}" if q["agreement"] is not None else ""),
        "health        " + ", ".join(f"{k}={v}" for k, v in summary["health"].items()),
        "lineage       " + (", ".join(f"{k}={v}" for k, v in summary["lineage"].items() if v) or "-"),
        f"golden        {summary['golden_vectors']} vectors",
        f"profile       {summary['profiled_features']} features",
        f"created       {summary['created_at'] or '-'}",
    ]
    click.echo("\n".join(lines))


@group.command("schema")
def schema_command() -> None:
    """Print the manifest's JSON Schema (the same as docs/manifest.schema.json)."""
    click.echo(json.dumps(json_schema(), indent=2, sort_keys=True))

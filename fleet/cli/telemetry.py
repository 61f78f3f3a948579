"""`edgefleet telemetry ...`: profiles, merged windows, drift and single reports, for operators.

Also runnable as `python -m fleet.cli.telemetry` (the same click group).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from agent.contract.manifest import ReferenceProfile
from agent.contract.performance import PerformanceSketch, copy_performance, merge_performance_into
from agent.contract.telemetry import NumericSketch, TelemetryReport
from agent.contract.telemetry_codec import decode_report
from agent.errors import MessageError
from fleet.errors import FleetInputError
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.drift import report_drift
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.performance import summarize
from fleet.telemetry.window_queries import histogram_quantile

out = Console()
err = Console(stderr=True)


def _load_profile(path: Path) -> ReferenceProfile:
    """A profile JSON, or a JSON with a `reference_profile` (a manifest, `bundle inspect --json`).

    `-` reads standard input, so `bundle inspect B.efb --json | telemetry drift --profile -`
    works. An empty profile (a bundle built with `--no-profile`) is refused: there is nothing
    to compare the telemetry with.
    """
    where = "standard input" if str(path) == "-" else str(path)
    try:
        doc = json.loads(sys.stdin.read() if str(path) == "-" else path.read_text())
        prof = ReferenceProfile.model_validate(doc.get("reference_profile", doc))
    except (OSError, ValueError, AttributeError) as exc:
        raise click.ClickException(f"{where}: not a reference profile, manifest or `bundle inspect --json` "
                                   f"output ({exc})") from None
    if not prof.features and not prof.outputs:
        raise click.ClickException(f"{where}: the reference profile is empty (a bundle built with "
                                   "--no-profile has no drift reference)")
    return prof


def _store(db: Path) -> TelemetryStore:
    if not db.exists():
        raise click.ClickException(f"{db}: no such telemetry database")
    return TelemetryStore(db)


def _since(hours: float | None) -> float | None:
    return None if hours is None else time.time() - hours * 3600.0


db_option = click.option("--db", type=click.Path(dir_okay=False, path_type=Path), required=True,
                         help="Telemetry database (the ingest's SQLite file).")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@click.group(name="telemetry")
def group() -> None:
    """Reference profiles, merged telemetry windows and drift."""


@group.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--names", required=True, help="Comma-separated feature names, one per column.")
@click.option("--outputs", "outputs_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model outputs on the same rows (.npy).")
@click.option("--bins", type=int, default=100, show_default=True, help="Percentile bins per numeric column.")
@click.option("--categorical", multiple=True, help="A categorical column (repeatable).")
@click.option("-o", "--output", "dest", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the profile JSON.")
def profile(features: Path, names: str, outputs_path: Path | None, bins: int, categorical: tuple[str, ...],
            dest: Path) -> None:
    """Compute a reference profile from FEATURES (.npy, rows x columns)."""
    try:
        x = np.load(features, allow_pickle=False)
        y = np.load(outputs_path, allow_pickle=False) if outputs_path else None
        prof = compute_reference_profile(x, [n.strip() for n in names.split(",")], outputs=y, bins=bins,
                                         categorical={c: [] for c in categorical})
    except (FleetInputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    dest.write_text(prof.model_dump_json(indent=1))
    err.print(f"profile: {len(prof.features)} features, {len(prof.outputs)} outputs, "
              f"{prof.sample_count} rows -> {dest}")


@group.command()
@db_option
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--cohort", default=None, help="Only this cohort (default: all).")
@click.option("--since-hours", type=float, default=None, help="Only windows of the last N hours.")
def windows(db: Path, model: str, version: str, cohort: str | None, since_hours: float | None) -> None:
    """List merged windows: reports, devices, requests, errors, latency p50/p95."""
    store = _store(db)
    table = Table("window (UTC)", "cohort", "reports", "devices", "requests", "errors", "p50 ms", "p95 ms")
    for w in store.windows(model, version, cohort, _since(since_hours)):
        rep = w["report"]
        assert isinstance(rep, TelemetryReport)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(str(w["window_start"]))))
        p50, p95 = (histogram_quantile(rep.latency_counts, q) * 1e3 for q in (0.5, 0.95))
        table.add_row(stamp, str(w["cohort"]) or "-", str(w["reports"]), str(w["device_count"]),
                      str(rep.requests), str(rep.errors), f"{p50:.2f}", f"{p95:.2f}")
    store.close()
    out.print(table)


@group.command()
@db_option
@click.option("--profile", "profile_path",
              type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path), required=True,
              help="The version's profile JSON, manifest JSON or `bundle inspect --json` output "
              "(- reads stdin).")
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--cohort", default=None, help="Only this cohort (default: all).")
@click.option("--since-hours", type=float, default=None, help="Only windows of the last N hours.")
@click.option("--method", type=click.Choice(["auto", "budget", "evidently", "ks", "wasserstein", "psi"]),
              default="auto", show_default=True,
              help="auto/budget: KS and chi-square under the false-alarm budget; "
              "evidently: Evidently's rule.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--fail-on-drift", is_flag=True, help="Exit with status 3 on dataset or prediction drift.")
def drift(db: Path, profile_path: Path, model: str, version: str, cohort: str | None,
          since_hours: float | None, method: str, as_json: bool, fail_on_drift: bool) -> None:
    """Drift of the merged windows against the reference profile, per feature and output."""
    prof = _load_profile(profile_path)
    store = _store(db)
    merged = store.query_windows(model, version, cohort, _since(since_hours))
    store.close()
    if merged is None:
        raise click.ClickException(f"no telemetry for {model} {version}")
    try:
        verdict = report_drift(prof, merged, method=method)  # type: ignore[arg-type]
    except FleetInputError as exc:
        raise click.ClickException(str(exc)) from None
    rows = [("output" if i >= len(verdict.features) else "feature", f)
            for i, f in enumerate(verdict.features + verdict.outputs)]
    if as_json:
        doc: dict[str, Any] = {
            "dataset_drift": verdict.dataset_drift, "prediction_drift": verdict.prediction_drift,
            "drifted_share": verdict.drifted_share,
            "columns": [{"role": role, "name": f.name, "method": f.method, "statistic": f.statistic,
                         "threshold": f.threshold, "p_value": f.p_value, "drifted": f.drifted,
                         "n_reference": f.n_reference, "n_current": f.n_current, "stats": f.stats}
                        for role, f in rows],
        }
        out.print_json(json.dumps(_clean(doc)))
    else:
        table = Table("role", "column", "test", "statistic", "threshold", "p-value", "n", "drift")
        for role, f in rows:
            table.add_row(role, f.name, f.method, f"{f.statistic:.4f}", f"{f.threshold:.4f}",
                          "-" if f.p_value is None else f"{f.p_value:.3g}", str(f.n_current),
                          "[red]yes[/red]" if f.drifted else "no")
        out.print(table)
        out.print(f"dataset drift: {verdict.dataset_drift} (share {verdict.drifted_share:.2f}); "
                  f"prediction drift: {verdict.prediction_drift}")
    if fail_on_drift and (verdict.dataset_drift or verdict.prediction_drift):
        sys.exit(3)


@group.command()
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def decode(payload: Path) -> None:
    """Decode one encoded report (as sent by a device) and print a summary."""
    data = payload.read_bytes()
    try:
        rep = decode_report(data)
    except MessageError as exc:
        raise click.ClickException(f"{payload}: {exc}") from None
    summary = {
        "bytes": len(data), "device_id": rep.device_id, "seq": rep.seq, "model": rep.model,
        "version": rep.version, "cohort": rep.cohort, "profile_id": rep.profile_id,
        "interval": [rep.interval_start, rep.interval_end], "requests": rep.requests, "errors": rep.errors,
        "rejected": rep.rejected, "dropped_reports": rep.dropped_reports,
        "merged_reports": rep.merged_reports,
        "features": [{"n": s.n, "nan": s.nan_count, **({"min": s.min, "max": s.max} if isinstance(
            s, NumericSketch) and s.n else {})} for s in rep.features],
        "outputs": len(rep.outputs),
    }
    out.print_json(json.dumps(_clean(summary)))


@group.command()
@db_option
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--cohort", default=None, help="Only this cohort (default: all merged).")
@click.option("--since-hours", type=float, default=None, help="Only windows of the last N hours.")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The version's manifest (or profile) JSON: needed for the label-free "
              "estimate (its calibration map's error band).")
@click.option("--per-window", is_flag=True, help="One row per window instead of the whole range.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def performance(db: Path, model: str, version: str, cohort: str | None, since_hours: float | None,
                profile_path: Path | None, per_window: bool, as_json: bool) -> None:
    """Realised accuracy (or MAE) from device labels beside the estimated accuracy (CBPE)."""
    prof = _load_profile(profile_path) if profile_path is not None else None
    store = _store(db)
    rows = store.windows(model, version, cohort, _since(since_hours))
    store.close()
    if not rows:
        raise click.ClickException(f"no telemetry for {model} {version}")
    groups: dict[float | None, PerformanceSketch | None] = {}
    for w in rows:
        rep = w["report"]
        assert isinstance(rep, TelemetryReport)
        key = float(str(w["window_start"])) if per_window else None
        acc = groups.get(key)
        if rep.performance is None:
            groups.setdefault(key, None)
        elif acc is None:
            groups[key] = copy_performance(rep.performance)
        else:
            try:
                merge_performance_into(acc, rep.performance)
            except MessageError as exc:
                raise click.ClickException(f"windows do not merge: {exc}") from None
    docs = []
    for key, sketch in groups.items():
        summary = summarize(sketch, prof)
        docs.append({"window_start": key, **(asdict(summary) if summary is not None else {"task": None})})
    if as_json:
        out.print_json(json.dumps(_clean({"model": model, "version": version, "items": docs})))
        return
    table = Table("window (UTC)", "task", "labelled", "accuracy", "MAE", "estimated", "95 % band",
                  "unknown", "expired")
    for d in docs:
        stamp = "all" if d["window_start"] is None else time.strftime(
            "%Y-%m-%d %H:%M", time.gmtime(d["window_start"]))
        fb = d.get("feedback") or {}
        band = "-" if d.get("estimate_low") is None else f"{d['estimate_low']:.3f}-{d['estimate_high']:.3f}"
        table.add_row(stamp, str(d.get("task") or "-"), str(d.get("labelled", 0)), _fmt(d.get("accuracy")),
                      _fmt(d.get("mae")), _fmt(d.get("estimated_accuracy")), band,
                      str(fb.get("unknown", 0)), str(fb.get("expired", 0)))
    out.print(table)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":  # pragma: no cover - `python -m fleet.cli.telemetry`
    group()

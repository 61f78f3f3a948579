"""`edgefleet agent ...`: commands that run on the device.

Each command is a plain function registered on `group`, so adding `run` or `status` is one
more `@group.command` below without touching the others. Library errors become one-line
click errors (exit 1) with the library's message; nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.errors import EdgefleetError, InputValidationError, ManifestError, MisuseError
from agent.logs import log_event

if TYPE_CHECKING:  # imported where used: `--help` and `init-config` need no model machinery
    import numpy as np

    from agent.contract.manifest import Manifest

_log = logging.getLogger("edgefleet.cli.agent")


class _LazyGroup(click.Group):
    """A group whose commands in `lazy` (`name -> module:attribute`) load on first use.

    Why: `agent enroll` needs the config schema, the runtime probe and an HTTP client, which
    `agent --help`, `predict` and the daemon's start do not; loaded by name like the root's
    entry-point plugins, its module is imported only when it is run or listed.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):  # pragma: no cover - wiring error
                raise click.ClickException(f"{self.lazy[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(name="agent", cls=_LazyGroup, lazy={"enroll": "agent.cli.enroll:enroll_command",
                                                  "report-key": "agent.cli.report_key:report_key_command"},
             context_settings={"help_option_names": ["-h", "--help"]})
def group() -> None:
    """Run the device agent, score files offline, inspect local state."""


def _model_dir_manifest(model_dir: Path) -> tuple[Manifest, Path]:
    """Manifest and model path of an extracted bundle directory, with the model's digest checked."""
    from agent.contract.manifest import parse_manifest  # lazy: CLI start-up (see above)

    manifest_path = model_dir / "manifest.json"
    if not manifest_path.is_file():
        raise MisuseError(f"{model_dir} has no manifest.json (is it an extracted bundle?)")
    manifest = parse_manifest(manifest_path.read_bytes())
    model_path = model_dir / manifest.model_file
    if not model_path.is_file():
        raise MisuseError(f"{model_dir} has no {manifest.model_file}")
    digest = hashlib.sha256()
    with model_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if "sha256:" + digest.hexdigest() != manifest.model_digest:
        raise ManifestError(f"{model_path.name} does not match the manifest's model_digest")
    return manifest, model_path


@contextlib.contextmanager
def _open_model_source(bundle: Path | None, model_dir: Path | None) -> Iterator[tuple[Manifest, Path]]:
    if (bundle is None) == (model_dir is None):
        raise click.UsageError("give exactly one of --bundle or --model-dir")
    if model_dir is not None:
        yield _model_dir_manifest(model_dir)
        return
    assert bundle is not None
    from agent.contract.bundle import extract_bundle  # lazy: CLI start-up

    with tempfile.TemporaryDirectory(prefix="edgefleet-predict-") as tmp:
        extracted = extract_bundle(bundle, Path(tmp) / "bundle", durable=False)
        yield extracted.manifest, extracted.model_path


@group.command("predict")
@click.option(
    "--bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A bundle file (.efb); verified and extracted to a temporary directory.",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An extracted bundle: manifest.json plus the model file.",
)
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write outputs (.npy, .csv or .jsonl); written atomically.",
)
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Examples per model call.",
)
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(1, 64), help="Runtime intra-op threads."
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ground truth, one per INPUT row (.npy, or text one per line): class indices for a "
    "classifier, numbers for a regressor. Prints accuracy and the confusion matrix (or MAE) "
    "as one JSON line on stdout, folded exactly as the agent folds labels sent to its API.",
)
def predict(
    bundle: Path | None,
    model_dir: Path | None,
    input_path: Path,
    output_path: Path,
    batch_size: int,
    threads: int,
    progress: bool,
    labels_path: Path | None,
) -> None:
    """Score INPUT (.npy, .csv or .jsonl) offline and write the model's outputs.

    Rows are validated against the manifest's input schema; a bad row stops the run with its
    row number and nothing is written.
    """
    import numpy as np  # lazy: CLI start-up

    from agent.runtimes import load_model  # lazy: CLI start-up
    from agent.serving.scoring_files import (  # lazy: CLI start-up
        OutputWriter,
        check_output,
        count_rows,
        file_format,
        iter_batches,
    )

    try:
        file_format(input_path)
        check_output(output_path)
        labels = _load_labels(labels_path) if labels_path is not None else None
        with _open_model_source(bundle, model_dir) as (manifest, model_path):
            model = load_model(model_path, manifest, threads=threads)
            total = count_rows(input_path)
            if labels is not None and labels.size != total:
                raise click.UsageError(f"{labels_path}: {labels.size} labels for {total} input rows")
            from agent.telemetry.performance import PerformanceFolder  # lazy: only with --labels

            folder = PerformanceFolder(_labelled_profile(manifest)) if labels is not None else None
            predicted: list[np.ndarray] = []
            t0 = time.perf_counter()
            with (
                contextlib.closing(model),
                OutputWriter(output_path, manifest, total) as writer,
                _progress(progress, total) as advance,
            ):
                for first, inputs in iter_batches(input_path, manifest, batch_size):
                    try:
                        outputs = model.predict(inputs)
                    except InputValidationError as exc:
                        rows = len(next(iter(inputs.values())))
                        raise InputValidationError(
                            f"{input_path.name} rows {first}-{first + rows - 1}: {exc}"
                        ) from None
                    writer.write(outputs)
                    advance(len(next(iter(outputs.values()))))
                    if folder is not None:
                        predicted.append(folder.predicted(next(iter(outputs.values()))))
            if folder is not None and labels is not None:
                _print_label_metrics(folder, np.concatenate(predicted), labels)
    except EdgefleetError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # e.g. the input vanished or became unreadable while scoring
        raise click.ClickException(f"{exc.filename or input_path}: {exc.strerror or exc}") from None
    elapsed = time.perf_counter() - t0
    log_event(
        _log,
        "predict.done",
        model=manifest.bundle_id,
        rows=total,
        output=str(output_path),
        seconds=round(elapsed, 3),
    )
    click.echo(f"scored {total} rows with {manifest.bundle_id} in {elapsed:.2f}s -> {output_path}", err=True)


def _labelled_profile(manifest: Manifest) -> Any:
    """The bundle's profile, or (a bundle without output profile) one whose task comes from
    the output tensor's width: several columns are a classifier's scores, one a regression."""
    from agent.contract.manifest import PerformanceSpec  # lazy: CLI start-up

    profile = manifest.reference_profile
    if profile.outputs or profile.performance is not None:
        return profile
    width = manifest.outputs[0].shape[-1] if len(manifest.outputs[0].shape) > 1 else 1
    spec = (PerformanceSpec(task="classification", classes=width) if width is not None and 2 <= width <= 256
            else PerformanceSpec(task="regression"))
    return profile.model_copy(update={"performance": spec})


def _load_labels(path: Path) -> np.ndarray:
    """Labels from .npy or a text file (one number per line). Raises `MisuseError`."""
    import numpy as np  # lazy: CLI start-up
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise MisuseError(f"cannot read labels {path}: {exc}") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise MisuseError(f"labels {path}: expected numbers, got {arr.dtype}")
    return np.asarray(arr, dtype=np.float64).ravel()


def _print_label_metrics(folder: Any, predicted: np.ndarray, labels: np.ndarray) -> None:
    """Fold and print `{"task", "labelled", "invalid", "accuracy"/"mae", "confusion"}` as JSON."""
    import json  # lazy: only with --labels

    import numpy as np  # lazy: CLI start-up

    invalid = folder.fold_labels(predicted, labels)
    sketch = folder.snapshot_and_reset()
    doc: dict[str, Any] = {"task": sketch.task, "labelled": sketch.labelled, "invalid": invalid}
    if sketch.task == "classification":
        cm = sketch.confusion
        doc["accuracy"] = float(np.trace(cm) / cm.sum()) if cm.sum() else None
        doc["confusion"] = cm.tolist()
    else:
        n = sketch.labelled
        doc["mae"] = sketch.error_abs_sum / n if n else None
        doc["rmse"] = float(np.sqrt(sketch.error_sq_sum / n)) if n else None
    click.echo(json.dumps(doc))


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], object]]:
    """A rich progress bar on stderr (a no-op callable when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("scoring", total=total)
        yield lambda n: bar.advance(task, n)


# --- the daemon ------------------------------------------------------------------------------
@group.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Agent config (JSON; see `edgefleet agent init-config`).")
def run_command(config_path: Path) -> None:
    """Run the agent: serve the active model, follow desired state, install, report (until SIGTERM)."""
    from agent.config import load_config  # lazy: CLI start-up
    from agent.daemon.core import AgentDaemon  # lazy: CLI start-up
    from agent.trust.identity_check import identity_warnings  # lazy: CLI start-up

    try:
        config = load_config(config_path)
        for event, fields in identity_warnings(config.mqtt.cert_file, config.mqtt.key_file):
            log_event(_log, event, logging.WARNING, **fields)
        daemon = AgentDaemon(config)
        threading.Thread(
            target=_trim_heap_when_ready, args=(daemon.ready,), name="agent-heap-trim", daemon=True
        ).start()
        code = daemon.run()
    except EdgefleetError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # e.g. the HTTP port is taken or the socket directory is not writable
        raise click.ClickException(f"cannot start the agent: {exc}") from None
    raise SystemExit(code)


@group.command("import")
@click.argument("offline_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Agent config (JSON; see `edgefleet agent init-config`).")
def import_command(offline_file: Path, config_path: Path) -> None:
    """Verify and install an offline update file (from `edgefleet fleet export-offline`), no network.

    Same checks as over MQTT (TUF metadata, director document, golden vectors, probation). The
    agent must not be running: a running agent imports files put in its `offline_drop_dir`.
    """
    from agent.config import load_config  # lazy: CLI start-up
    from agent.daemon.core import AgentDaemon  # lazy: CLI start-up

    try:
        result = AgentDaemon(load_config(config_path)).import_offline(offline_file)
    except EdgefleetError as exc:
        raise click.ClickException(f"offline import refused: {type(exc).__name__}: {exc}") from None
    click.echo(f"installed {result.bundle_id} from {offline_file.name} (state {result.state})")


def _trim_heap_when_ready(ready: threading.Event) -> None:
    """Once the daemon serves, hand the heap that start-up freed back to the OS (glibc only).

    Start-up (imports, compiling modules, parsing config and manifest, loading the model) leaves
    freed but still mapped malloc memory behind that an idle agent never reuses; `malloc_trim`
    returns it (~0.5 MB RSS in `agent_footprint`, docs/benchmarks.md). Elsewhere (musl) a no-op.
    """
    ready.wait()
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@group.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Agent config (JSON) whose state directory to read.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw state record as JSON.")
def status_command(config_path: Path, as_json: bool) -> None:
    """Show the lifecycle state record (state, active/previous/staged bundles, last error) and
    the broker connection as the running agent last saw it."""
    import json as _json

    from agent.config import load_config  # lazy: CLI start-up
    from agent.daemon.broker_link import BrokerStatus  # lazy: CLI start-up
    from agent.lifecycle.slots import Slots  # lazy: CLI start-up
    from agent.lifecycle.state_store import StateStore  # lazy: CLI start-up

    try:
        cfg = load_config(config_path)
        record = StateStore(cfg.state_dir / "lifecycle").load()
    except EdgefleetError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(record.to_json().decode())
        return
    lifecycle_dir = cfg.state_dir / "lifecycle"
    installed = Slots(lifecycle_dir).installed() if lifecycle_dir.exists() else []
    desired = record.desired.bundle_id if record.desired else None
    link = BrokerStatus.read(cfg.state_dir)
    broker = link.describe(time.time()) if link else "unknown (no agent has run with this state directory)"
    rows = [
        ("device", cfg.device_id), ("broker", broker), ("state", record.state), ("active", record.active),
        ("previous", record.previous), ("staged", record.staged), ("candidate", record.candidate),
        ("shadow", record.shadow), ("desired", desired), ("director_sequence", record.director_sequence),
        ("quarantined", ", ".join(f"{b}@{s}" for b, s in record.quarantined.items()) or None),
        ("installed", ", ".join(installed) or None), ("last_error", record.last_error),
        ("measurements", _json.dumps(record.last_measurements) if record.last_measurements else None),
    ]
    for key, value in rows:
        click.echo(f"{key:18} {'-' if value is None else value}")


@group.command("init-config")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def init_config_command(output: Path | None, force: bool) -> None:
    """Write a commented example config to OUTPUT (or stdout)."""
    from agent.config import EXAMPLE_CONFIG  # lazy: CLI start-up

    if output is None:
        click.echo(EXAMPLE_CONFIG, nl=False)
        return
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists (use --force to overwrite)")
    output.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)

"""What MLflow recorded about the run that produced a model: params, metrics, tags.

Two sources, both read into one `RunRecord`:

- an `mlruns`-style run directory on disk (`<run_id>/meta.yaml`, `params/<name>` holding the
  value, `metrics/<name>` holding `timestamp value step` lines, `tags/<name>`): MLflow's file
  store writes it, and a model logged by a run sits under `<run>/artifacts/<artifact_path>/`,
  so the run directory is found from the model directory when the model was logged there;
- a `models:/<name>/<version>` (or `models:/<name>@<alias>`) reference resolved by MLflow's own
  client (`pip install 'edgefleet[mlflow]'`), which downloads the model directory and reads the
  run from the tracking server named by `MLFLOW_TRACKING_URI`.

Everything read is bounded (file sizes and counts), because a server-side import reads
directories a caller named. Nothing here touches the registry: `mlflow_import` turns a
`RunRecord` into lineage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleet.errors import FleetInputError, FleetMisuseError, NotFound

MAX_RUN_FILES = 500
MAX_VALUE_BYTES = 64 * 1024
MAX_METRIC_BYTES = 4 * 1024 * 1024
_NAME_RE = re.compile(r"^[\w.\-/ ]{1,250}$")
#: Tags copied into the lineage (`source.<key>`, or the code reference for the git commit).
GIT_COMMIT_TAG = "mlflow.source.git.commit"
RUN_NAME_TAG = "mlflow.runName"
MODELS_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
MLFLOW_EXTRA_HINT = "pip install 'edgefleet[mlflow]'"


@dataclass(frozen=True)
class RunRecord:
    """The parts of an MLflow run that become lineage."""

    run_id: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # the run directory or tracking URI it was read from


def _read_small(path: Path, limit: int) -> str:
    try:
        if path.stat().st_size > limit:
            raise FleetInputError(f"{path} is larger than {limit} bytes")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetInputError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FleetInputError(f"{path} is not UTF-8 text") from None


def _entries(folder: Path, limit: int) -> dict[str, str]:
    """Name -> text of every file under `folder` (MLflow nests names with `/` as directories)."""
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > MAX_RUN_FILES:
        raise FleetInputError(f"{folder} holds more than {MAX_RUN_FILES} entries")
    out = {}
    for path in files:
        name = path.relative_to(folder).as_posix()
        if _NAME_RE.match(name):
            out[name] = _read_small(path, limit)
    return out


def _last_metric(name: str, text: str) -> float:
    """The latest value of a metric file (`timestamp value step` per line, oldest first)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    try:
        return float(lines[-1][1])
    except (IndexError, ValueError):
        raise FleetInputError(f"metric {name!r} is not in MLflow's 'timestamp value step' format") from None


def read_run_dir(run_dir: Path) -> RunRecord:
    """Read an `mlruns`-style run directory. Raises FleetInputError when it is not one."""
    meta_path = run_dir / "meta.yaml"
    if not meta_path.is_file():
        raise FleetInputError(f"{run_dir} is not an MLflow run directory (no meta.yaml)")
    try:
        # BaseLoader: every scalar stays text, so a run id of digits is not read as a number.
        meta = yaml.load(_read_small(meta_path, MAX_VALUE_BYTES), Loader=yaml.BaseLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise FleetInputError(f"{meta_path} is not valid YAML: {exc}") from None
    if not isinstance(meta, dict) or not meta.get("run_id"):
        raise FleetInputError(f"{meta_path} names no run_id")
    metrics = {k: _last_metric(k, v) for k, v in _entries(run_dir / "metrics", MAX_METRIC_BYTES).items()}
    return RunRecord(
        run_id=str(meta["run_id"]),
        params={k: v.strip() for k, v in _entries(run_dir / "params", MAX_VALUE_BYTES).items()},
        metrics=metrics,
        tags={k: v.strip() for k, v in _entries(run_dir / "tags", MAX_VALUE_BYTES).items()
              if k in (GIT_COMMIT_TAG, RUN_NAME_TAG)},
        origin=str(run_dir),
    )


def find_run_dir(model_dir: Path, run_id: str, root: Path | None = None) -> Path | None:
    """The run directory a model was logged into (`<run_id>/artifacts/.../<model_dir>`), if any.

    Only ancestors inside `root` (when given) are considered: a server-side import must not
    read outside its import directory.
    """
    here = model_dir.resolve()
    limit = None if root is None else root.resolve()
    for parent in here.parents:
        if limit is not None and parent != limit and limit not in parent.parents:
            return None
        if parent.name == "artifacts" and parent.parent.name == run_id:
            run_dir = parent.parent
            return run_dir if (run_dir / "meta.yaml").is_file() else None
    return None


def run_for_model(model_dir: Path, run_id: str | None, run_dir: Path | None = None,
                  root: Path | None = None) -> RunRecord | None:
    """The run record for a model: from `run_dir` if given (it must be `run_id`'s), else found.

    Raises FleetInputError when the given run directory is another run than the model's.
    """
    if run_dir is None:
        if not run_id:
            return None
        run_dir = find_run_dir(model_dir, run_id, root)
        if run_dir is None:
            return None
    record = read_run_dir(run_dir)
    if run_id and record.run_id != run_id:
        raise FleetInputError(f"run directory {run_dir} is run {record.run_id}, but the MLmodel names "
                              f"run {run_id}")
    return record


def parse_models_uri(uri: str) -> tuple[str, str]:
    """(`name`, `version-or-@alias`) of a `models:/` reference; FleetInputError otherwise."""
    match = MODELS_URI_RE.match(uri)
    if match is None:
        raise FleetInputError(f"{uri!r} is not a models:/<name>/<version> or models:/<name>@<alias> "
                              "reference")
    return match["name"], match["version"] or "@" + match["alias"]


def download_models_uri(uri: str, dest: Path) -> tuple[Path, RunRecord | None]:
    """Resolve `models:/...` with MLflow's client: (local model directory, the run behind it).

    Raises FleetMisuseError when MLflow is not installed (naming the extra), NotFound when the
    registry has no such model or version, FleetInputError for a malformed reference or any
    other refusal by MLflow.
    """
    parse_models_uri(uri)
    try:
        import mlflow.artifacts  # lazy: optional extra, and a second of import time
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FleetMisuseError(f"{uri} is resolved by MLflow's client, which is not installed: "
                               f"{MLFLOW_EXTRA_HINT}") from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in message.lower():
            raise NotFound(f"MLflow has no {uri}: {message}") from None
        raise FleetInputError(f"MLflow refused {uri}: {message}") from None
    except OSError as exc:
        raise FleetInputError(f"cannot download {uri}: {exc}") from None
    run_id = _run_id_of(local)
    if not run_id:
        return local, None
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return local, None  # the run was deleted: the model still imports, without run lineage
    return local, RunRecord(
        run_id=run_id,
        params={str(k): str(v) for k, v in run.data.params.items()},
        metrics={str(k): float(v) for k, v in run.data.metrics.items()},
        tags={k: str(v) for k, v in run.data.tags.items() if k in (GIT_COMMIT_TAG, RUN_NAME_TAG)},
        origin=str(mlflow.get_tracking_uri()),
    )


def _run_id_of(model_dir: Path) -> str | None:
    try:
        doc = yaml.load(_read_small(model_dir / "MLmodel", MAX_METRIC_BYTES), Loader=yaml.BaseLoader)  # noqa: S506
    except (FleetInputError, yaml.YAMLError):
        return None
    value = doc.get("run_id") if isinstance(doc, dict) else None
    return str(value) if value else None


def param_value(text: str) -> str | int | float | bool:
    """An MLflow param (always stored as text) as the number or flag it was logged as, if exactly one."""
    if text in ("True", "False", "true", "false"):
        return text.lower() == "true"
    try:
        as_int = int(text)
        if str(as_int) == text:
            return as_int
    except ValueError:
        pass
    try:
        as_float = float(text)
        if repr(as_float) == text or str(as_float) == text:
            return as_float
    except ValueError:
        pass
    return text

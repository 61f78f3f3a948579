"""The work of each training job step (the I/O the worker does after persisting a decision).

- `collected`: the dataset versions of the policy's collect policy from the job's cohort
  (`fleet.registry.datasets.DatasetStore`) and their row count;
- `train`: export and concatenate them, label rows without `y` (the device's label where the
  sample carries one, else the policy's labeler, in a subprocess), split collected and
  reference rows into train and holdout (seeded by the job id), write the trainer's inputs,
  run the trainer (`fleet.training.runner`) and check what it wrote (`fleet.training.interface.read_output`);
- `build`: the bundle pipeline (`fleet.registry.builder.build_bundle`: quantize and its gate,
  golden vectors, reference profile, confidence calibration on the holdout), then the accuracy
  gate (`fleet.training.gate`) of the built model against the parent on the holdout;
- `publish`: `fleet.registry.publish.publish_bundle` with the training lineage (the caller runs
  it inside the transaction that ends the job's publishing) and the canary rollout.

Everything a step writes is under `<data_dir>/training/<job>/`; nothing outside it changes
before `publish`. Errors: `TrainingFailed` (the user's code, bad output), `FleetInputError`
(bad data, the pipeline refused the model), `GateFailed` (the accuracy or int8 gate).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.bundle import extract_bundle
from agent.contract.collect import CollectPolicy
from agent.contract.manifest import Lineage, parse_manifest
from agent.errors import EdgefleetError
from fleet.collection.records import CollectionStore
from fleet.devices.selector import parse_selector
from fleet.errors import Conflict, FleetInputError, GateFailed, NotFound
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.datasets import DatasetStore, DatasetVersion
from fleet.registry.model_runner import make_runner
from fleet.registry.publish import publish_bundle
from fleet.registry.versions import ModelVersion
from fleet.rollouts.gates import GateThresholds
from fleet.rollouts.store import Rollout
from fleet.rollouts.strategies import StrategyConfig
from fleet.store import Store
from fleet.training import gate
from fleet.training.interface import TrainerJob, read_output
from fleet.training.jobs import TrainingJob
from fleet.training.policy import PLACEHOLDERS, TrainingPolicy
from fleet.training.runner import TrainingFailed, harness_argv, run_step
from fleet.trust.repository import Repository

Lines = Callable[[str], None]


@dataclass(frozen=True)
class StepContext:
    """What a step may touch, and where it reports (`log`, `progress`, `cancelled`)."""

    store: Store
    repository: Repository
    datasets: DatasetStore | None
    collections: CollectionStore | None
    data_dir: Path
    log: Lines
    progress: Callable[[float, str], None]
    cancelled: Callable[[], bool]


def job_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / "training" / job_id


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as exc:
        raise FleetInputError(f"cannot read {path.name}: {exc}") from None


def collection_id(job: TrainingJob) -> str:
    """The collection a job starts (derived from the job id: a restart finds the same one)."""
    return "col-" + job.id.removeprefix("tj-")


def start_collection(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy) -> None:
    """Ask the trigger's cohort for a sample on the parent version (once; idempotent)."""
    if policy.collect is None or ctx.collections is None:
        return
    cid = collection_id(job)
    try:
        ctx.collections.get(cid)
        return
    except NotFound:
        pass
    selector = f"cohort={job.cohort}" if job.cohort else ""
    spec = CollectPolicy(policy_id=cid, **policy.collect.model_dump())
    with contextlib.suppress(Conflict):  # another worker made it in between
        ctx.collections.create(job.model, job.parent_version, selector, spec, f"training:{job.id}")
    ctx.log(f"collection {cid} started on {selector or 'every device'} of {job.model}:"
            f"{job.parent_version}")


def stop_collection(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy) -> None:
    if policy.collect is not None and ctx.collections is not None:
        with contextlib.suppress(NotFound):
            ctx.collections.stop(collection_id(job))


def collected(ctx: StepContext, policy: TrainingPolicy, job: TrainingJob) -> list[DatasetVersion]:
    """The dataset versions the job may train on: its own collection's (or the policy's named
    collection's), from the cohort's devices."""
    if ctx.datasets is None:
        return []
    policy_id = collection_id(job) if policy.collect is not None else policy.collect_policy_id
    if policy_id is None:
        return []
    cohort = job.cohort
    found = ctx.datasets.versions(policy_id)
    if cohort:
        members = set(ctx.store.devices.ids_matching(parse_selector(f"cohort={cohort}")))
        found = [v for v in found if v.device_id in members]
    return found


def all_versions(ctx: StepContext) -> list[DatasetVersion]:
    return [] if ctx.datasets is None else ctx.datasets.versions()


def reference_data(ctx: StepContext, policy: TrainingPolicy) -> tuple[np.ndarray, np.ndarray]:
    """The policy's reference `.npz` (`x` rows, `y` labels; a relative path is under data_dir)."""
    path = Path(policy.reference_data)
    path = path if path.is_absolute() else ctx.data_dir / path
    z = _npz(path)
    if "x" not in z or "y" not in z:
        raise FleetInputError(f"reference data {path.name} needs arrays x and y")
    x, y = z["x"], z["y"]
    if x.ndim != 2 or y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise FleetInputError("reference data: x must be 2-D and y one integer label per row")
    return x.astype(np.float32), y.astype(np.int64)


def parent_model(ctx: StepContext, model: str, version: str, dest: Path) -> Path:
    """Extract the parent version's bundle under `dest`; the model file. Raises FleetInputError."""
    try:
        target = ctx.store.models.get_version(model, version).bundle_target
    except NotFound as exc:
        raise FleetInputError(f"parent version {model}:{version} does not exist") from exc
    if not target:
        raise FleetInputError(f"parent version {model}:{version} has no bundle")
    ref = ctx.repository.target_ref(target)
    dirname, _, basename = ref.path.rpartition("/")
    path = ctx.repository.targets_dir / dirname / f"{ref.sha256}.{basename}"
    try:
        return extract_bundle(path, dest, durable=False).model_path
    except EdgefleetError as exc:
        raise FleetInputError(f"parent bundle of {model}:{version} is unreadable: {exc}") from None


def _split(n: int, fraction: float, seed: int) -> np.ndarray:
    """A boolean holdout mask over n rows (at least one row each side when n >= 2)."""
    mask = np.zeros(n, dtype=bool)
    if n >= 2:
        k = min(max(1, round(n * fraction)), n - 1)
        mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def _seed(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")


def _collected_rows(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy, work: Path) -> tuple[
        np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for did in job.dataset_ids:
        z = _npz_bytes(ctx.datasets.export_npz(did) if ctx.datasets is not None else b"", did)
        x = z["x"].astype(np.float32)
        y = z.get("y")
        if y is None:
            x, y = _label_rows(ctx, policy, work, did, len(xs), x, z.get("labels"))
        xs.append(x)
        ys.append(np.asarray(y).astype(np.int64))
    if not xs:
        raise FleetInputError("the job has no collected dataset")
    return np.concatenate(xs), np.concatenate(ys)


def _label_rows(ctx: StepContext, policy: TrainingPolicy, work: Path, did: str, n: int, x: np.ndarray,
                device: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of one dataset: the device's labels where it has them (`labels`, NaN
    for unknown), the policy's labeler for the other rows; without a labeler, only the rows
    the device labelled (none: `FleetInputError`)."""
    known = np.zeros(len(x), bool)
    if device is not None and device.shape == (len(x),):
        known = np.isfinite(device)
    y = np.where(known, device if device is not None else 0.0, 0.0)
    if known.all():
        return x, y
    if policy.labeler is None:
        if not known.any():
            raise FleetInputError(f"dataset {did} has no labels and the policy names no labeler")
        ctx.log(f"dataset {did}: {int(known.sum())} rows labelled by devices, {int((~known).sum())} "
                "unlabelled rows left out (the policy names no labeler)")
        return x[known], y[known]
    xin, yout = work / f"label-{n}-x.npz", work / f"label-{n}-y.npz"
    np.savez(xin, x=x[~known])
    run_step(harness_argv("label", str(xin), str(yout), policy.labeler), work,
             policy.trainer.timeout_s, ctx.log, cancelled=ctx.cancelled, what="labeler", env=_env(policy))
    out = _npz(yout).get("y")
    if out is None or out.shape != (int((~known).sum()),):
        raise TrainingFailed(f"the labeler gave no labels for dataset {did}")
    y[~known] = out
    if known.any():
        ctx.log(f"dataset {did}: {int(known.sum())} rows labelled by devices, {len(out)} by the labeler")
    return x, y


def _npz_bytes(data: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as exc:
        raise FleetInputError(f"dataset {what} is unreadable: {exc}") from None


def train(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy) -> dict[str, float]:
    """Prepare the inputs, label, run the trainer; its metrics. The model is left in the job
    directory (`out/model.onnx`) with the holdout (`holdout.npz`) for `build`."""
    root = job_dir(ctx.data_dir, job.id)
    shutil.rmtree(root, ignore_errors=True)  # a restarted step starts from its inputs again
    (root / "out").mkdir(parents=True)
    work = root / "work"
    work.mkdir()
    ctx.progress(0.02, "preparing data")
    rx, ry = reference_data(ctx, policy)
    cx, cy = _collected_rows(ctx, job, policy, work)
    if cx.shape[1] != rx.shape[1]:
        raise FleetInputError(f"collected rows have {cx.shape[1]} columns, the reference {rx.shape[1]}")
    seed = _seed(job.id)
    hold_r, hold_c = _split(len(rx), policy.gate.holdout_fraction, seed), _split(
        len(cx), policy.gate.holdout_fraction, seed + 1)
    np.savez(root / "reference.npz", x=rx[~hold_r], y=ry[~hold_r])
    np.savez(root / "train.npz", x=cx[~hold_c], y=cy[~hold_c], dataset_ids=np.array(job.dataset_ids))
    np.savez(root / "holdout.npz", x=np.concatenate([rx[hold_r], cx[hold_c]]),
             y=np.concatenate([ry[hold_r], cy[hold_c]]),
             collected=np.concatenate([np.zeros(int(hold_r.sum()), bool), np.ones(int(hold_c.sum()), bool)]))
    parent = parent_model(ctx, job.model, job.parent_version, root / "parent")
    shutil.copyfile(parent, root / "parent.onnx")
    spec = TrainerJob(job.id, job.model, job.parent_version, str(root / "reference.npz"),
                      str(root / "train.npz"), str(root / "parent.onnx"), str(root / "out"), seed)
    (root / "job.json").write_text(spec.to_json())
    ctx.progress(0.1, "training")
    if policy.trainer.entry_point is not None:
        argv = harness_argv("train", str(root / "job.json"), policy.trainer.entry_point)
    else:
        values = dict(zip(PLACEHOLDERS, (str(root / "job.json"), spec.reference, spec.train, spec.out_dir,
                                         spec.parent_model), strict=True))
        argv = [_fill(a, values) for a in policy.trainer.command or ()]
    run_step(argv, work, policy.trainer.timeout_s, ctx.log,
             lambda f, t: ctx.progress(0.1 + 0.6 * f, t or "training"), ctx.cancelled, env=_env(policy))
    return read_output(root / "out").metrics


def _env(policy: TrainingPolicy) -> dict[str, str] | None:
    return {**os.environ, **policy.trainer.env} if policy.trainer.env else None


def _fill(arg: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        arg = arg.replace(k, v)
    return arg


def inherited(manifest_path: Path) -> dict[str, Any]:
    """What the new version keeps of its parent's bundle: the health policy, compatibility,
    golden tolerances and the reference profile's names, vocabularies and bin count (so its
    drift telemetry and alerts speak of the same features, and devices judge it the same way)."""
    try:
        parent = parse_manifest(json.loads(manifest_path.read_bytes()))
    except (OSError, ValueError, EdgefleetError) as exc:
        raise FleetInputError(f"the parent's manifest is unreadable: {exc}") from None
    out: dict[str, Any] = {"health": parent.health, "compatibility": parent.compatibility,
                           "rtol": parent.golden.rtol, "atol": parent.golden.atol,
                           "label_agreement_min": parent.golden.label_agreement_min}
    profile = parent.reference_profile
    if profile is not None and profile.features:
        out["feature_names"] = [f.name for f in profile.features]
        out["output_names"] = [o.name for o in profile.outputs]
        out["categorical"] = {f.name: list(f.vocabulary) for f in [*profile.features, *profile.outputs]
                              if f.kind == "categorical"}
        numeric = [len(f.edges) - 1 for f in profile.features if f.kind == "numeric" and len(f.edges) > 1]
        if numeric:
            out["bins"] = max(1, min(max(numeric), 1024))
    return out


def next_version(store: Store, model: str, parent: str) -> str:
    """The parent's next free patch version (`1.2.3` -> `1.2.4`, or later if taken)."""
    major, minor, patch = (int(p) for p in parent.split("+")[0].split("-")[0].split("."))
    while True:
        patch += 1
        candidate = f"{major}.{minor}.{patch}"
        try:
            store.models.get_version(model, candidate)
        except NotFound:
            return candidate


def build(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy, version: str,
          trainer_metrics: dict[str, float]) -> dict[str, float]:
    """Bundle the trained model as `version` and gate it; the gate's figures. Raises GateFailed."""
    root = job_dir(ctx.data_dir, job.id)
    out = read_output(root / "out")  # checked again: the directory survived a restart
    rx, _ = reference_data(ctx, policy)
    hold = _npz(root / "holdout.npz")
    collected_rows = np.concatenate([_npz(root / "train.npz")["x"].astype(np.float32),
                                     hold["x"][hold["collected"].astype(bool)].astype(np.float32)])
    profile_rows = collected_rows if policy.profile == "collected" else np.concatenate([rx, collected_rows])
    lineage = Lineage(training_code_ref=policy.trainer.entry_point or " ".join(policy.trainer.command or ()),
                      dataset_ref=",".join(job.dataset_ids), metrics=trainer_metrics)
    keep = inherited(root / "parent" / "manifest.json")
    meta = BundleMetadata.model_validate({**keep, "name": job.model, "version": version, "lineage": lineage,
                                          "quantize": policy.quantize})
    bundle = root / f"{job.model}-{version}.efb"
    bundle.unlink(missing_ok=True)
    ctx.progress(0.75, "building bundle")
    build_bundle(root / "out" / "model.onnx", meta, bundle, reference_data=profile_rows,
                 holdout_data=hold["x"], holdout_labels=hold["y"],
                 progress=lambda step, f: ctx.progress(0.75 + 0.15 * f, step))
    ctx.progress(0.92, "accuracy gate")
    with tempfile.TemporaryDirectory(prefix="train-gate-") as scratch:
        built = extract_bundle(bundle, Path(scratch) / "b", durable=False)
        new_run = make_runner(built.model_path.read_bytes(), built.manifest.runtime)
        name, out_name = built.manifest.inputs[0].name, built.manifest.outputs[0].name
        new_out = new_run({name: hold["x"].astype(np.float32)})[out_name]
    parent_bytes = (root / "parent.onnx").read_bytes()
    p_run = make_runner(parent_bytes, "onnx")
    p_out = next(iter(p_run({name: hold["x"].astype(np.float32)}).values()))
    del out
    fig = gate.figures(new_out, p_out, hold["y"], hold["collected"].astype(bool))
    problems = gate.judge(policy.gate, fig)
    if problems:
        raise GateFailed("accuracy gate: " + "; ".join(problems), fig.as_metrics())
    return fig.as_metrics()


def publish(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy) -> ModelVersion:
    """Register the built bundle with the training lineage (call inside the job's transaction)."""
    assert job.result_version is not None
    bundle = job_dir(ctx.data_dir, job.id) / f"{job.model}-{job.result_version}.efb"
    source: dict[str, Any] = {"training_job": job.id, "trigger_alert_id": job.trigger_alert_id,
                              "dataset_ids": list(job.dataset_ids),
                              "parent_version": f"{job.model}:{job.parent_version}"}
    return publish_bundle(ctx.store, ctx.repository, bundle, job.model, f"training:{job.id}",
                          create_model=False, source=source)


def start_canary(ctx: StepContext, job: TrainingJob, policy: TrainingPolicy, actor: str) -> Rollout:
    """Create the canary rollout of the job's version on the trigger's cohort."""
    selector = policy.selector.replace("{cohort}", job.cohort or "")
    StrategyConfig.parse(dict(policy.strategy))  # FleetInputError: a plan the controller cannot run
    GateThresholds.parse(dict(policy.thresholds))
    return ctx.store.rollouts.create(f"{job.model}:{job.result_version}", selector, dict(policy.strategy),
                                     dict(policy.thresholds), actor)

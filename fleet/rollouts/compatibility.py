"""Refuse a rollout that would change what its cohort's devices serve, unless asked to.

Why: a rollout of `mlp` (32 inputs) to devices serving `sensor-clf` (6 inputs) was accepted,
the devices swapped, and every client call failed from then on. A rollout is meant to replace
a model with a newer version of itself; moving a cohort to another model, or to inputs or
outputs its clients do not send or read, must be said explicitly (`allow_model_change`).

What is compared, per bundle a cohort device reports as `active_bundle`: the model name (from
the TUF target's `{name, version}` labels), and the input and output tensors (name, dtype,
shape) of both bundles' manifests, read from the TUF repository's target files. A device with
no active bundle, or a bundle the repository does not list, is not compared (nothing to
protect, or nothing known); nor are the tensors when a manifest cannot be read.

Errors: `check_cohort` raises Conflict naming the devices and what differs, FleetInputError
(selector) and NotFound (version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.contract.director import TargetRef
from agent.contract.manifest import TensorSpec
from agent.errors import EdgefleetError
from fleet.devices.selector import parse_selector
from fleet.errors import Conflict
from fleet.registry.sealed_manifest import read_published_manifest
from fleet.rollouts.record_types import bundle_index
from fleet.rollouts.records import RolloutRecords

if TYPE_CHECKING:
    from fleet.store import Store
    from fleet.trust.repository import Repository

#: Devices named per differing bundle in the refusal (the rest are counted).
MAX_NAMED = 5


@dataclass(frozen=True, slots=True)
class ModelInterface:
    """What a client of a bundle depends on: the model's name and its tensors (None = unknown)."""

    name: str
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None


def _tensors(specs: list[TensorSpec]) -> tuple[str, ...]:
    return tuple(f"{t.name}:{t.dtype}[{','.join('?' if d is None else str(d) for d in t.shape)}]"
                 for t in specs)


def interface_of(repository: Repository, ref: TargetRef) -> ModelInterface:
    """The interface of a published bundle; tensors None when its manifest cannot be read."""
    dirname, _, basename = ref.path.rpartition("/")
    path = Path(repository.targets_dir) / dirname / f"{ref.sha256}.{basename}"
    try:
        manifest = read_published_manifest(repository.repo_dir, path)  # a sealed one too
    except (EdgefleetError, OSError):
        return ModelInterface(ref.name)
    return ModelInterface(ref.name, _tensors(manifest.inputs), _tensors(manifest.outputs))


def difference(target: ModelInterface, served: ModelInterface) -> str | None:
    """Why `served` cannot be replaced by `target` silently (None when it can)."""
    if served.name != target.name:
        return f"model {served.name!r}, not {target.name!r}"
    for kind in ("inputs", "outputs"):
        old, new = getattr(served, kind), getattr(target, kind)
        if old is not None and new is not None and old != new:
            return f"{kind} {', '.join(old)} (the rollout's: {', '.join(new)})"
    return None


def describe(differing: Mapping[str, tuple[str, list[str]]]) -> str:
    """One sentence per served bundle: which devices, and what differs."""
    parts = []
    for bundle, (why, devices) in sorted(differing.items()):
        named = ", ".join(sorted(devices)[:MAX_NAMED])
        more = f" and {len(devices) - MAX_NAMED} more" if len(devices) > MAX_NAMED else ""
        parts.append(f"{len(devices)} device(s) ({named}{more}) serve {bundle}: {why}")
    return "; ".join(parts)


def check_cohort(store: Store, repository: Repository, model_version_id: str, selector: str) -> None:
    """Raise Conflict when devices `selector` matches serve another model or interface."""
    devices = store.devices.ids_matching(parse_selector(selector))
    served = {d: r.active_bundle for d, r in RolloutRecords(store).reported_states(devices).items()
              if r.active_bundle}
    if not served or not repository.initialized:
        return
    version = store.models.get_version_by_id(model_version_id)
    index = bundle_index(repository)
    target_ref = repository.target_ref(version.bundle_target) if version.bundle_target else None
    target = interface_of(repository, target_ref) if target_ref else ModelInterface(version.model_name)
    target_id = f"{version.model_name}-{version.version}"
    cache: dict[str, str | None] = {}
    differing: dict[str, tuple[str, list[str]]] = {}
    for device, bundle in served.items():
        if bundle == target_id or bundle not in index:
            continue
        if bundle not in cache:
            cache[bundle] = difference(target, interface_of(repository, index[bundle]))
        why = cache[bundle]
        if why is not None:
            differing.setdefault(bundle, (why, []))[1].append(device)
    if differing:
        raise Conflict(f"rollout of {model_version_id} would change what its cohort serves: "
                       f"{describe(differing)}; set allow_model_change to do it anyway")

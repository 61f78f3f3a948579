"""Set a fleet up for load devices: register them in the store, publish the two bundles a rollout
moves them between. Used by `edgefleet sim load`, the tests and the scale benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleet.components import ensure_trust
from fleet.devices.selector import parse_selector
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.publish import publish_bundle
from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.device_keys import sim_device_public_key
from simulators.models import make_mlp_onnx

MODEL = "loadmlp"
LOAD_LABELS = {"env": "load"}


def device_ids(count: int, prefix: str = "load") -> list[str]:
    """`load-00000`, `load-00001`, ...: clearly load devices in every listing."""
    return [f"{prefix}-{i:05d}" for i in range(count)]


def register_devices(store: Store, ids: Sequence[str], labels: dict[str, str] | None = None) -> int:
    """Enroll `ids` directly in the store (one transaction; no broker credentials: the load
    broker is anonymous). Returns how many were new."""
    known = set(store.devices.ids_matching(parse_selector(""), include_revoked=True))
    new = [d for d in ids if d not in known]
    with store.tx():
        for dev in new:
            store.devices.create(dev, dict(labels or LOAD_LABELS), {"agent_version": "load-device"}, dev,
                                 "-", "sim:load")
            store.report_keys.register(dev, sim_device_public_key(dev), "sim:load", audited=False)
    return len(new)


def publish_versions(settings: FleetSettings, store: Store, workdir: Path,
                     versions: Sequence[str] = ("1.0.0", "2.0.0")) -> list[str]:
    """Build and publish one small MLP bundle per version; returns their model version ids."""
    workdir.mkdir(parents=True, exist_ok=True)
    _, repo = ensure_trust(settings)
    reference = np.random.default_rng(3).standard_normal((500, 32)).astype(np.float32)
    out = []
    for i, version in enumerate(versions):
        onnx = workdir / f"{MODEL}-{version}.onnx"
        onnx.write_bytes(make_mlp_onnx(i))
        names = [f"f{j}" for j in range(32)]
        meta = BundleMetadata(name=MODEL, version=version, feature_names=names, bins=10)
        bundle = build_bundle(onnx, meta, workdir / f"{MODEL}-{version}.efb", reference_data=reference)
        out.append(publish_bundle(store, repo, bundle, MODEL, "sim:load").id)
    return out


def online_count(store: Store, ids_prefix: str = "load-") -> int:
    """How many load devices the inventory sees online (their reported state arrived)."""
    with store.read() as db:
        return int(db.scalar("SELECT COUNT(*) FROM devices WHERE online = 1 AND id LIKE :prefix",
                             {"prefix": ids_prefix + "%"}))

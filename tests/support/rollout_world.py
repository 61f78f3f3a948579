"""The rollout controller over a real SQLite store, TUF repository and director signer.

Devices are played by the test: they write reported states into the store and send events
through `controller.on_event`; a recorder stands in for the MQTT publisher. Time is an
injected clock. Every state change the controller computes through the transition table
(`machine.run_events`) is kept in `World.transitions`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.contract.protocol import Event
from fleet.rollouts import machine
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.controller_ports import ControllerConfig
from fleet.rollouts.gates import VersionMetrics
from fleet.rollouts.machine import RolloutEvent, RolloutState
from fleet.store import Store
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend

V1, V2 = "mlp-1.0.0", "mlp-2.0.0"
#: One `machine.run_events` call: from, the events in order, to.
Run = tuple[RolloutState, tuple[RolloutEvent, ...], RolloutState]


@dataclass
class Recorder:
    """Stands in for `Publisher.publish_desired`: keeps every document per device."""

    docs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str:
        assert device_id is not None
        self.docs.setdefault(device_id, []).append(json.loads(document)["signed"])
        return f"t/{device_id}"

    def last_target(self, device: str) -> str | None:
        docs = self.docs.get(device)
        return f"{docs[-1]['target']['name']}-{docs[-1]['target']['version']}" if docs else None


@dataclass
class World:
    root: Path
    clock: FakeClock
    store: Store
    repo: Repository
    signer: DirectorSigner
    pub: Recorder
    ctl: RolloutController
    metrics: dict[str, VersionMetrics] = field(default_factory=dict)
    transitions: list[Run] = field(default_factory=list)
    location: Path | str = ""  # where the store lives (a SQLite path or the PostgreSQL URL)

    def enroll(self, *devices: str, labels: dict[str, str] | None = None, on: str | None = V1) -> None:
        for dev in devices:
            self.store.devices.create(dev, labels or {"env": "prod"}, {}, dev, "$7$x", "test")
            if on is not None:
                self.report(dev, "idle", on)

    def report(self, dev: str, state: str, active: str | None) -> None:
        self.store.devices.record_reported_state(
            dev, {"state": state, "active_bundle": active, "timestamp": self.clock.now})

    def event(self, dev: str, kind: str, bundle: str, reason: str = "") -> None:
        self.ctl.on_event(dev, Event(type=kind, bundle_id=bundle, reason=reason, timestamp=self.clock.now,
                                     seq=int(self.clock.now * 1000)))

    def rollout(self, strategy: dict[str, Any], thresholds: dict[str, float] | None = None,
                selector: str = "env=prod") -> str:
        return str(self.store.rollouts.create("mlp:2.0.0", selector, strategy, thresholds or {}, "op").id)

    def devices(self, rid: str) -> dict[str, str]:
        return {r.device_id: r.status for r in self.store.rollouts.devices(rid, None, 500).items}

    def assigned(self, rid: str) -> list[str]:
        return sorted(d for d, s in self.devices(rid).items() if s != "pending")

    def state(self, rid: str) -> tuple[str, int]:
        ro = self.store.rollouts.get(rid)
        return ro.state, ro.stage

    def commit_all(self, devices: list[str], bundle: str = V2) -> None:
        for d in devices:
            self.report(d, "idle", bundle)

    def new_controller(self) -> RolloutController:
        return RolloutController(self.store, self.repo, self.signer, self.pub, self.clock,
                                 ControllerConfig(tick_s=0.05), metrics=self)

    def version_metrics(self, model: str, version: str, since: float,
                        devices: object = None) -> VersionMetrics | None:
        return self.metrics.get(f"{model}-{version}")


@pytest.fixture
def world(tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """A controller over a store on each backend (`backend`: SQLite, then PostgreSQL)."""
    clock = FakeClock()
    location = backend.location("fleet.db")
    store = Store(location, clock=clock)
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    store.models.create_model("mlp", "", "test")
    for version in ("1.0.0", "2.0.0"):
        blob = tmp_path / f"mlp-{version}.efb"
        blob.write_bytes(b"bundle " + version.encode())
        path = f"models/mlp/mlp-{version}.efb"
        repo.add_target(blob, path, {"name": "mlp", "version": version})
        store.models.register_version("mlp", version, DIGEST, "onnx", {}, "test", bundle_target=path)
    signer = DirectorSigner(KeyStore(tmp_path / "keys"), tmp_path / "director", database=backend.pg_url)
    w = World(tmp_path, clock, store, repo, signer, Recorder(), None, location=location)  # type: ignore[arg-type]
    w.ctl = w.new_controller()
    run_events = machine.run_events

    def recording(state: RolloutState, events: Iterable[RolloutEvent]) -> RolloutState:
        fired = tuple(events)
        after = run_events(state, fired)
        w.transitions.append((state, fired, after))
        return after

    monkeypatch.setattr(machine, "run_events", recording)
    yield w
    store.close()

"""Shared setup for the agent daemon tests: a real fleet side and real agent processes.

The fleet side runs in the test process: `simulators.sim_fleet.SimFleet` (the swarm's and
the demo's fleet side: keys, TUF repository, `DirectorSigner`, a `Publisher` serving the
repository over a private Mosquitto, every reported state and event collected by device),
wrapped by `Fleet` for what these tests need on top: the lifecycle tests' fast bundles
(`tests.support.lifecycle_world.Repo`, golden vectors on `X`), raw telemetry payloads by
device, and waits that fail with a message. Agents are real subprocesses
(`python -m agent.cli agent run --config ...`) reached through their local API; a kill at a
lifecycle state goes through `tests.support.kill_at`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.contract.protocol import Event, ReportedState, Topics, encode_event
from agent.errors import EdgefleetError
from agent.lifecycle.state_store import StateRecord, StateStore
from agent.serving.client import HttpInferenceClient, UnixInferenceClient
from fleet.delivery.publisher import PublisherSettings
from simulators.models import mlp_reference, mlp_weights
from simulators.sim_fleet import SimFleet, poll_until
from tests.support.broker import Broker, free_port, start_mosquitto
from tests.support.lifecycle_world import Repo, X

PREFIX = "ef-agent"
ROOT = Path(__file__).resolve().parents[2]
#: bundle id -> model seed (the reference outputs of a served bundle come from its seed)
SEEDS = {"mlp-1.0.0": 1, "mlp-2.0.0": 2, "mlp-3.0.0": 3, "mlp-4.0.0": 4}


def reference(bundle_id: str, x: np.ndarray = X) -> np.ndarray:
    return mlp_reference(x, mlp_weights(SEEDS[bundle_id]))


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns a truthy value; raise AssertionError with `what` on timeout."""
    value = poll_until(pred, timeout, poll_s=0.05)
    if not value:
        raise AssertionError(f"timed out waiting for {what}")
    return value


class Fleet:
    """`SimFleet` as the daemon tests see it; `reported`/`events`/`telemetry` are its records.

    A layer, not a copy: keys, repository, signer, publisher and the collected reports are the
    `SimFleet`'s own objects (`telemetry` is its `payloads`: raw reports by device). Bundles
    come from `repo` (`Repo.publish`: the lifecycle tests' bundles, whose golden vectors run
    on `X`), not from `SimFleet.publish_bundle`, whose builder makes reference profiles the
    daemon tests do not need.
    """

    def __init__(self, root: Path, broker: Broker) -> None:
        self.root = root
        self.broker = broker
        # the tests' broker restarts fast: reconnect within 0.5 s, as the agents do
        self.sim = SimFleet(
            root,
            broker.host,
            broker.port,
            prefix=PREFIX,
            publisher_settings=PublisherSettings(),
            reconnect_max_s=0.5,
            ingest_telemetry=False,
        )
        self.repo = Repo(root, self.sim.repo)
        self.signer = self.sim.signer
        self.publisher = self.sim.publisher
        self.lock = self.sim.lock
        self.reported = self.sim.reported
        self.events = self.sim.events
        self.telemetry = self.sim.payloads

    def issue(self, device: str, bundle_id: str, shadow: str | None = None, publish: bool = True) -> bytes:
        """Sign (and publish, retained) a director document naming `bundle_id` for `device`."""
        ref = self.repo.repo.target_ref(self.repo.refs[bundle_id].path)
        sh = self.repo.repo.target_ref(self.repo.refs[shadow].path) if shadow else None
        doc = self.signer.issue(ref, device_id=device, shadow=sh)
        if publish:
            self.publisher.publish_desired(device_id=device, document=doc)
        return doc

    def event_types(self, device: str) -> list[str]:
        with self.lock:
            return [e.type for e in self.events[device]]

    def events_of(self, device: str, kind: str) -> list[Event]:
        return self.sim.events_of(kind, [device])

    def state(self, device: str) -> ReportedState | None:
        with self.lock:
            return self.reported.get(device)

    def wait_state(
        self, device: str, active: str, state: str = "idle", timeout: float = 30.0
    ) -> ReportedState:
        def ok() -> ReportedState | None:
            s = self.state(device)
            return (
                s if s is not None and s.active_bundle == active and s.state == state and s.online else None
            )

        return wait_until(
            ok, timeout, f"{device} reporting {state} with {active} (last: {self.state(device)})"
        )

    def wait_event(self, device: str, kind: str, count: int = 1, timeout: float = 30.0) -> Event:
        wait_until(
            lambda: len(self.events_of(device, kind)) >= count,
            timeout,
            f"{count} {kind!r} event(s) from {device} (got {self.event_types(device)})",
        )
        return self.events_of(device, kind)[count - 1]

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Block until the fleet's subscriptions are live again (after a broker restart).

        The test broker keeps no sessions across a restart, so an event published before the
        fleet has re-subscribed is dropped by the broker: that is the broker's behaviour, not
        the agent's, and tests that restart the broker must not race it. Publishes a probe
        event as a made-up device until the fleet's own subscription hands it back.
        """
        probe = f"probe-{time.monotonic_ns()}"
        topic = Topics(PREFIX).events(probe)
        payload = encode_event(Event(device_id=probe, type="probe", timestamp=time.time(), seq=1))
        deadline = time.monotonic() + timeout
        while not self.events_of(probe, "probe"):
            if time.monotonic() > deadline:
                raise AssertionError("fleet did not re-subscribe after the broker restart")
            if self.publisher.transport.connected:
                with contextlib.suppress(EdgefleetError):
                    self.publisher.transport.publish(topic, payload, qos=1)
            time.sleep(0.2)


def start_fleet(root: Path, broker: Broker) -> Fleet:
    """The fleet side with bundles v1-v4 published (v3 carries v2's golden vectors: it fails
    activation), listening on `broker`."""
    fleet = Fleet(root, broker)
    fleet.repo.publish("1.0.0", model_seed=1)
    fleet.repo.publish("2.0.0", model_seed=2)
    fleet.repo.publish("3.0.0", model_seed=3, golden_seed=2)  # golden vectors of v2: fails activation
    fleet.repo.publish("4.0.0", model_seed=4)
    fleet.sim.start()
    return fleet


@dataclass
class Agent:
    """One agent process (restartable) with its config, state dir and local API."""

    device: str
    config_path: Path
    state_dir: Path
    socket: Path
    http_port: int | None
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, kill_at: str | None = None) -> Agent:
        """Run `agent run`; with `kill_at`, through `tests.support.kill_at`, which SIGKILLs the
        process right after a record in that lifecycle state is saved."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        launcher = ["tests.support.kill_at", kill_at] if kill_at else ["agent.cli"]
        run = ["--log-json", "agent", "run", "--config", str(self.config_path)]
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *launcher, *run],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.device} did not stop on signal {sig}; log:\n{self.tail()}") from None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def record(self) -> StateRecord:
        return StateStore(self.state_dir / "lifecycle").load()

    def predict_unix(self, x: np.ndarray = X) -> np.ndarray:
        client = UnixInferenceClient(self.socket, timeout=5.0)
        try:
            return np.asarray(client.predict({"x": x})["logits"])
        finally:
            client.close()

    def predict_http(self, x: np.ndarray = X) -> np.ndarray:
        assert self.http_port is not None
        client = HttpInferenceClient("127.0.0.1", self.http_port, timeout=5.0)
        try:
            return np.asarray(client.predict({"x": x})["logits"])
        finally:
            client.close()

    def serves(self, bundle_id: str) -> bool:
        """True when the Unix API (and the HTTP API, where enabled: the agent starts it just
        after the Unix one) answers with `bundle_id`'s reference outputs."""
        try:
            outs = [self.predict_unix()]
            if self.http_port is not None:
                outs.append(self.predict_http())
        except Exception:
            return False
        return all(np.allclose(out, reference(bundle_id), atol=1e-4) for out in outs)

    def wait_serving(self, bundle_id: str, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.serves(bundle_id), timeout, f"{self.device} serving {bundle_id}:\n{self.tail()}"
        )


A = TypeVar("A", bound=Agent)


def write_agent_config(
    device: str,
    state: Path,
    root_json: Path,
    broker_port: int,
    labels: dict[str, str],
    agent_cls: type[A],
    http: bool = False,
    **overrides: Any,
) -> A:
    """Write a fast-timing agent config for `device` beside its state dir; returns its handle.

    The socket goes to a short temp dir (AF_UNIX paths are limited to 108 bytes)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="efa-"))
    state.mkdir(parents=True, exist_ok=True)
    port = free_port() if http else None
    config: dict[str, Any] = {
        "device_id": device,
        "labels": labels,
        "state_dir": str(state),
        "bootstrap_root": str(root_json),
        "topic_prefix": PREFIX,
        "mqtt": {
            "port": broker_port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "connect_timeout_s": 2.0,
        },
        "api": {"http_enabled": http, "http_port": port or 0, "unix_socket": str(sock_dir / "a.sock")},
        "limits": {"chunk_timeout_s": 2.0, "fetch_reconnect_wait_s": 2.0},
        "lifecycle": {"retry_base_s": 0.5, "retry_max_s": 2.0, "load_timeout_s": 10.0},
        "telemetry_interval_s": 1.0,
        "report_interval_s": 0.2,
        **overrides,
    }
    path = state.parent / f"{device}.json"
    path.write_text(json.dumps(config, indent=1))
    return agent_cls(device, path, state, sock_dir / "a.sock", port, state.parent / f"{device}.log")


def make_agent(
    fleet: Fleet,
    device: str,
    broker_port: int | None = None,
    http: bool = True,
    state_dir: Path | None = None,
    **overrides: Any,
) -> Agent:
    """An agent of the `lab` cohort for `fleet` (see `write_agent_config`)."""
    return write_agent_config(
        device, state_dir or fleet.root / "devices" / device, fleet.repo.repo.metadata_dir / "1.root.json",
        broker_port or fleet.broker.port, {"test": "daemon"}, Agent, http, cohorts=["lab"], **overrides)


def clone_state(src: Path, dest: Path) -> None:
    """Copy a stopped agent's state directory (a device provisioned with the same bundles)."""
    shutil.copytree(src, dest, symlinks=True)


@contextmanager
def running_fleet(root: Path) -> Iterator[Fleet]:
    """A private Mosquitto plus the fleet side (repository, signer, publisher), stopped after."""
    broker = start_mosquitto(root / "broker")
    fleet = start_fleet(root, broker)
    try:
        yield fleet
    finally:
        fleet.sim.stop()
        broker.stop()

"""Shared setup for the agent daemon tests: a real fleet side and real agent processes.

The fleet side runs in the test process: a TUF `Repository`, a `DirectorSigner` and a
`Publisher` serving the repository over a private Mosquitto, collecting every reported
state, event and telemetry report by device. Agents are real subprocesses
(`python -m agent.cli agent run --config ...`) reached through their local API.
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
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.protocol import Event, ReportedState, Topics, encode_event
from agent.errors import EdgefleetError
from agent.lifecycle.state_store import StateRecord, StateStore
from agent.serving.client import HttpInferenceClient, UnixInferenceClient
from agent.transport.mqtt_client import MqttConfig
from fleet.delivery.dedupe import EventDeduper
from fleet.delivery.publisher import Publisher
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from simulators.models import mlp_reference, mlp_weights
from tests.support.broker import Broker, free_port, start_mosquitto
from tests.support.lifecycle_world import Repo, X, make_repo

PREFIX = "ef-agent"
ROOT = Path(__file__).resolve().parents[2]
#: bundle id -> model seed (the reference outputs of a served bundle come from its seed)
SEEDS = {"mlp-1.0.0": 1, "mlp-2.0.0": 2, "mlp-3.0.0": 3, "mlp-4.0.0": 4}


def reference(bundle_id: str, x: np.ndarray = X) -> np.ndarray:
    return mlp_reference(x, mlp_weights(SEEDS[bundle_id]))


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns a truthy value; raise AssertionError with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Fleet:
    """The fleet side of the tests; `reported`/`events`/`telemetry` are filled by callbacks."""

    root: Path
    broker: Broker
    repo: Repo
    signer: DirectorSigner
    publisher: Publisher
    reported: dict[str, ReportedState] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    telemetry: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

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
        with self.lock:
            return [e for e in self.events[device] if e.type == kind]

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
    repo = make_repo(root)
    repo.publish("1.0.0", model_seed=1)
    repo.publish("2.0.0", model_seed=2)
    repo.publish("3.0.0", model_seed=3, golden_seed=2)  # golden vectors of v2: fails activation
    repo.publish("4.0.0", model_seed=4)
    signer = DirectorSigner(KeyStore(root / "keys"), root / "director")
    publisher = Publisher(
        MqttConfig(port=broker.port, client_id=f"fleet-{os.getpid()}", reconnect_max_s=0.5),
        PREFIX,
        repo.repo.repo_dir,
    )
    fleet = Fleet(root, broker, repo, signer, publisher)

    def on_reported(device: str, state: ReportedState) -> None:
        with fleet.lock:
            fleet.reported[device] = state

    def on_event(device: str, event: Event) -> None:
        with fleet.lock:
            fleet.events[device].append(event)

    def on_telemetry(device: str, payload: bytes) -> None:
        with fleet.lock:
            fleet.telemetry[device].append(payload)

    publisher.on_reported(on_reported)
    publisher.on_event(EventDeduper(on_event))  # as `fleet serve`: events come at least once
    publisher.on_telemetry(on_telemetry)
    publisher.start()
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
        env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_TEST_KILL_AT"}
        env["PYTHONPATH"] = str(ROOT)
        if kill_at:
            env["EDGEFLEET_TEST_KILL_AT"] = kill_at
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "--log-json",
                "agent",
                "run",
                "--config",
                str(self.config_path),
            ],
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
        """True when the Unix API answers with `bundle_id`'s reference outputs."""
        try:
            out = self.predict_unix()
        except Exception:
            return False
        return bool(np.allclose(out, reference(bundle_id), atol=1e-4))

    def wait_serving(self, bundle_id: str, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.serves(bundle_id), timeout, f"{self.device} serving {bundle_id}:\n{self.tail()}"
        )


def make_agent(
    fleet: Fleet,
    device: str,
    broker_port: int | None = None,
    http: bool = True,
    state_dir: Path | None = None,
    **overrides: Any,
) -> Agent:
    """Write a config for `device` (short socket path: AF_UNIX paths are limited to 108 bytes)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="efa-"))
    state = state_dir or fleet.root / "devices" / device
    state.mkdir(parents=True, exist_ok=True)
    port = free_port() if http else None
    config: dict[str, Any] = {
        "device_id": device,
        "cohorts": ["lab"],
        "labels": {"test": "daemon"},
        "state_dir": str(state),
        "bootstrap_root": str(fleet.repo.repo.metadata_dir / "1.root.json"),
        "topic_prefix": PREFIX,
        "mqtt": {
            "port": broker_port or fleet.broker.port,
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
    return Agent(device, path, state, sock_dir / "a.sock", port, state.parent / f"{device}.log")


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
        fleet.publisher.stop()
        broker.stop()

"""The fleet side of a simulation: real keys, TUF repository, director, publisher, telemetry store.

Why assembled here instead of `fleet.service`: scenarios need the fleet's components in one
process with hooks to watch them (every reported state, event and telemetry payload, by
device) and to act as an operator or an attacker would (build and publish bundles, sign
director documents for devices or cohorts, replay an old one). Every piece is the fleet's own
code; nothing here decides what a device does.

The agent daemon tests use the same class (through `tests.support.agent_world`) with
`ingest_telemetry=False`: they check what one device sent, payload by payload, rather than
the store's windows, so every payload is kept by device instead.

Errors: methods raise the fleet's errors (`FleetInputError` for a bad bundle,
`FleetTransportError` when the broker is unreachable).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.contract.bundle import read_manifest, write_bundle
from agent.contract.director import TargetRef
from agent.contract.manifest import Manifest
from agent.contract.protocol import Event, ReportedState
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.dedupe import EventDeduper
from fleet.delivery.publisher import Publisher, PublisherSettings
from fleet.errors import FleetTransportError
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.datagen import DataGenerator, Schema, default_schema
from simulators.models import make_mlp_onnx, make_mlp_tflite

MODEL_NAME = "mlp"
T = TypeVar("T")
# Health budgets of the simulator's bundles: generous latency and timeouts because hundreds of
# agents share two cores here (a golden run may wait seconds for the GIL); the bad-model
# scenarios rely on golden vectors, which fail whatever the load (and commit on them alone:
# traffic "none", since a scenario may pause the swarm's traffic during a rollout).
SIM_HEALTH: dict[str, Any] = {
    "traffic": "none",
    "probation_requests": 0,
    "probation_seconds": 0.5,
    "latency_budget_ms": 2000.0,
    "inference_timeout_s": 20.0,
}


@dataclass(frozen=True)
class PublishedBundle:
    """A bundle in the repository: its id, TUF reference and manifest."""

    bundle_id: str
    ref: TargetRef
    manifest: Manifest


class SimFleet:
    """Keys, repository, director signer and publisher under `root`, watching every device."""

    def __init__(
        self,
        root: Path,
        broker_host: str,
        broker_port: int,
        prefix: str = "edgefleet",
        schema: Schema | None = None,
        publisher_settings: PublisherSettings | None = None,
        window_s: float = 60.0,
        *,
        reconnect_max_s: float = 1.0,
        ingest_telemetry: bool = True,
    ) -> None:
        """`ingest_telemetry=False`: no telemetry store (no SQLite, no ingest thread); every
        payload is kept in `payloads` by device, for a caller that decodes them itself."""
        self.root = root
        self.prefix = prefix
        self.window_s = window_s
        self.schema = schema or default_schema()
        self.keys = KeyStore(root / "keys")
        self.repo = Repository(root / "repo", self.keys)
        self.repo.init(root_threshold=1, root_keys=1)
        self.signer = DirectorSigner(self.keys, root / "director")
        self.bundles: dict[str, PublishedBundle] = {}
        self.lock = threading.Lock()
        self.reported: dict[str, ReportedState] = {}
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.telemetry_payloads = 0
        self.payloads: dict[str, list[bytes]] = defaultdict(list)  # only without ingestion
        # The telemetry store's SQLite connection belongs to the thread that opened it, so one
        # ingest thread owns it; the MQTT thread only queues payloads (and never blocks on disk).
        self.ingest_results: Counter[str] = Counter()
        self._ingest_q: queue.Queue[Any] = queue.Queue(maxsize=100_000)
        self._store_ready = threading.Event()
        self._ingest_thread: threading.Thread | None = None
        if ingest_telemetry:
            self._ingest_thread = threading.Thread(target=self._ingest_loop, name="sim-ingest", daemon=True)
            self._ingest_thread.start()
            self._store_ready.wait(30)
        self.publisher = Publisher(
            MqttConfig(
                host=broker_host,
                port=broker_port,
                client_id=f"simfleet-{os.getpid()}",
                reconnect_max_s=reconnect_max_s,
            ),
            prefix,
            self.repo.repo_dir,
            publisher_settings or PublisherSettings(workers=4, max_pending_per_device=16),
        )
        self.publisher.on_reported(self._on_reported)
        self.publisher.on_event(EventDeduper(self._on_event))  # agents send events at least once
        self.publisher.on_telemetry(self._on_telemetry)

    @property
    def bootstrap_root(self) -> Path:
        return self.repo.metadata_dir / "1.root.json"

    def start(self) -> SimFleet:
        self.publisher.start()
        return self

    def stop(self) -> None:
        self.publisher.stop()
        if self._ingest_thread is not None:
            self._ingest_q.put(None)
            self._ingest_thread.join(30)

    def _ingest_loop(self) -> None:
        self.telemetry = TelemetryStore(
            self.root / "telemetry.sqlite",
            IngestConfig(window_s=self.window_s),
            profiles=self._profile_lookup,
        )
        self._store_ready.set()
        try:
            while (item := self._ingest_q.get()) is not None:
                if isinstance(item, tuple):
                    device, payload = item
                    state = self.reported.get(device)
                    cohort = state.labels.get("cohort") if state is not None else None
                    self.ingest_results[self.telemetry.ingest(payload, cohort=cohort)] += 1
                else:
                    item()
                self._ingest_q.task_done()
        finally:
            self.telemetry.close()

    def on_store(self, fn: Callable[[TelemetryStore], Any], timeout: float = 60.0) -> Any:
        """Run `fn(store)` on the ingest thread (after everything queued before it); its result.

        Raises `FleetTransportError` after `timeout`, or what `fn` raised.
        """
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            try:
                box.append(fn(self.telemetry))
            except Exception as exc:
                box.append(exc)
            done.set()

        self._ingest_q.put(call)
        if not done.wait(timeout):
            raise FleetTransportError("telemetry store did not answer in time")
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    # --- watching ------------------------------------------------------------------------
    def _on_reported(self, device: str, state: ReportedState) -> None:
        with self.lock:
            self.reported[device] = state

    def _on_event(self, device: str, event: Event) -> None:
        with self.lock:
            self.events[device].append(event)

    def _on_telemetry(self, device: str, payload: bytes) -> None:
        with self.lock:
            self.telemetry_payloads += 1
            if self._ingest_thread is None:
                self.payloads[device].append(payload)
                return
        self._ingest_q.put((device, payload))

    def _profile_lookup(self, model: str, version: str) -> Any:
        b = self.bundles.get(f"{model}-{version}")
        return b.manifest.reference_profile if b is not None else None

    def active_counts(self, devices: Iterable[str] | None = None) -> Counter[str]:
        """How many devices report each active bundle (None counted as "none")."""
        with self.lock:
            states = dict(self.reported)
        wanted = set(devices) if devices is not None else set(states)
        return Counter((states[d].active_bundle or "none") if d in states else "unknown" for d in wanted)

    def devices_on(self, bundle_id: str, devices: Iterable[str], state: str = "idle") -> list[str]:
        with self.lock:
            return [
                d
                for d in devices
                if (s := self.reported.get(d)) is not None
                and s.active_bundle == bundle_id
                and s.state == state
            ]

    def events_of(self, kind: str, devices: Iterable[str] | None = None) -> list[Event]:
        with self.lock:
            pool = devices if devices is not None else list(self.events)
            return [e for d in pool for e in self.events.get(d, []) if e.type == kind]

    def online(self, devices: Iterable[str]) -> int:
        with self.lock:
            return sum(1 for d in devices if (s := self.reported.get(d)) is not None and s.online)

    # --- acting as the operator ----------------------------------------------------------------
    def publish_bundle(
        self,
        version: str,
        model_seed: int,
        *,
        golden_seed: int | None = None,
        quantize: str = "none",
        health: dict[str, Any] | None = None,
        compatibility: dict[str, Any] | None = None,
        runtime: str = "onnx",
    ) -> PublishedBundle:
        """Build `mlp-<version>` (see `build_mlp_bundle`) and add it to the repository."""
        out = build_mlp_bundle(
            self.root / "build",
            self.schema,
            version,
            model_seed,
            golden_seed=golden_seed,
            quantize=quantize,
            health=health,
            compatibility=compatibility,
            runtime=runtime,
        )
        return self._add(out, version)

    def _add(self, bundle_file: Path, version: str) -> PublishedBundle:
        manifest = read_manifest(bundle_file)
        ref = self.repo.add_target(
            bundle_file,
            f"models/{MODEL_NAME}/{MODEL_NAME}-{version}.efb",
            {"name": MODEL_NAME, "version": version},
        )
        self.publisher.publish_metadata()
        pb = PublishedBundle(manifest.bundle_id, ref, manifest)
        self.bundles[pb.bundle_id] = pb
        return pb

    def assign(
        self, bundle_id: str, *, devices: Iterable[str] = (), cohort: str | None = None
    ) -> list[bytes]:
        """Sign and publish (retained) director documents naming `bundle_id`; returns them."""
        ref = self.bundles[bundle_id].ref
        docs = []
        if cohort is not None:
            doc = self.signer.issue(ref, cohort=cohort)
            self.publisher.publish_desired(cohort=cohort, document=doc)
            docs.append(doc)
        for d in devices:
            doc = self.signer.issue(ref, device_id=d)
            self.publisher.publish_desired(device_id=d, document=doc)
            docs.append(doc)
        return docs

    def wait(self, pred: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
        return wait_for(pred, timeout, poll_s)


def wait_for(pred: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
    """Poll `pred` until it holds or `timeout` s pass; its last answer (checked once more at the end)."""
    return poll_until(pred, timeout, poll_s)


def poll_until(pred: Callable[[], T], timeout: float, poll_s: float = 0.1) -> T:
    """Call `pred` every `poll_s` s until it returns a truthy value or `timeout` s pass.

    Returns that value, else `pred`'s answer once more at the end (falsy unless it just
    turned): callers that want what the condition found (a state, an event) get it back.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(poll_s)
    return pred()


def build_mlp_bundle(
    work: Path,
    schema: Schema,
    version: str,
    model_seed: int,
    *,
    golden_seed: int | None = None,
    quantize: str = "none",
    health: dict[str, Any] | None = None,
    compatibility: dict[str, Any] | None = None,
    reference_rows: int = 4000,
    runtime: str = "onnx",
) -> Path:
    """Build `work/mlp-<version>.efb` with the real bundle builder: the seeded MLP, a reference
    profile from the schema's undrifted data, golden vectors, optional int8 quantization.

    `runtime="tflite"` builds the TFLite twin of the model instead of the ONNX one.
    `golden_seed` != `model_seed` gives a correctly built bundle whose golden vectors come from
    another model: it fails its golden check on every device (the cheapest bad model).
    Raises the builder's errors (`FleetInputError`, `GateFailed`, `FleetMisuseError`).
    """
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / f"{MODEL_NAME}-{version}.{'tflite' if runtime == 'tflite' else 'onnx'}"
    model_path.write_bytes(make_mlp_tflite(model_seed) if runtime == "tflite" else make_mlp_onnx(model_seed))
    reference = DataGenerator(schema, seed=model_seed).batch(reference_rows)
    fields: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": version,
        "feature_names": schema.names,
        "categorical": schema.categorical_vocabulary(),
        "quantize": quantize,
        "bins": 50,
        "golden_count": 8,
        "health": health or SIM_HEALTH,
        "seed": model_seed,
    }
    if compatibility:
        fields["compatibility"] = compatibility
    meta = BundleMetadata.model_validate(fields)
    out = work / f"{MODEL_NAME}-{version}.efb"
    if golden_seed is None or golden_seed == model_seed:
        build_bundle(model_path, meta, out, reference_data=reference)
        return out
    donor_model = work / f"golden-{version}.onnx"
    donor_model.write_bytes(make_mlp_onnx(golden_seed))
    donor, real = out.with_suffix(".donor.tmp"), out.with_suffix(".real.tmp")
    build_bundle(donor_model, meta, donor, reference_data=reference)
    build_bundle(model_path, meta, real, reference_data=reference)
    manifest = read_manifest(real).model_copy(update={"golden": read_manifest(donor).golden})
    write_bundle(manifest, model_path.read_bytes(), out)
    for tmp in (donor, real, donor_model):
        tmp.unlink()
    return out

"""Fleet ingest throughput: reports decoded, validated, deduplicated, merged and persisted.

5,000 reports (100 devices x 50 one-minute intervals, 20 features + 1 output, 100 inferences
each) are encoded up front; the timed part is `TelemetryStore.ingest` for each payload plus
the final `flush` into a fresh SQLite file (WAL, batched writes every 1,000 reports).
Baseline in the same run: `decode_report` alone over the same payloads.
Goal: `ingest_reports_per_s` >= 5,000.

Signed reports (issue 14): the same payloads, each signed as its device (`sign_us_per_report`,
the load devices' signer: what a device pays), then let through the fleet's check
(`fleet.delivery.report_verify.ReportVerifier`: Ed25519 verify + one conditional UPDATE of the
device's counter in a fleet SQLite store) before `ingest`: `ingest_verified_reports_per_s`,
beside `ingest_reports_per_s` of the same run, and the check alone (`verify_reports_per_s`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from agent.contract.manifest import ReferenceProfile
from agent.contract.protocol import Topics
from agent.contract.report_auth import HEADER
from agent.contract.telemetry_codec import decode_report, encode_report
from agent.telemetry import TelemetrySketch
from agent.transport import Message
from fleet.delivery.report_verify import ReportVerifier
from fleet.registry.profile import compute_reference_profile
from fleet.store import Store
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from simulators.device_keys import sim_device_public_key
from simulators.load_devices.signing import LoadSigner

NAME = "ingest"
DESCRIPTION = "telemetry reports decoded + checked + deduplicated + merged + persisted per second"
DEVICES = 100
INTERVALS = 50


def report_payloads(devices: int = DEVICES,
                    intervals: int = INTERVALS) -> tuple[ReferenceProfile, list[bytes]]:
    """The profile and `intervals` encoded one-minute reports of each of `devices` sketching 20
    normal features (shared with `bench_ingest_scale`, so both measure the same reports)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20_000, 20)).astype(np.float32)
    prof = compute_reference_profile(ref, [f"f{i}" for i in range(20)], outputs=ref[:, :3].sum(axis=1))
    payloads: list[bytes] = []
    for d in range(devices):
        ticks = iter(np.arange(1_700_000_000.0, 1_700_000_000.0 + 60.0 * (intervals + 1), 60.0).tolist())
        sk = TelemetrySketch(prof, f"device-{d:04d}", "mlp", "1.0.0", clock=ticks.__next__,
                             resource_probe=lambda: (40_000_000, 0.5, 0.1))
        for _ in range(intervals):
            x = rng.normal(size=(100, 20)).astype(np.float32)
            sk.update(x, x[:, :3].sum(axis=1), 0.002)
            payloads.append(encode_report(sk.snapshot_and_reset()))
    return prof, payloads


def run() -> dict[str, float]:
    prof, payloads = report_payloads()
    t0 = time.perf_counter()
    for p in payloads:
        decode_report(p)
    decode_s = time.perf_counter() - t0
    rates = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            store = TelemetryStore(Path(tmp) / "telemetry.db", IngestConfig(window_s=60.0, flush_every=1000),
                                   profiles=lambda m, v: prof, clock=lambda: 1_700_010_000.0)
            t0 = time.perf_counter()
            for p in payloads:
                store.ingest(p)
            store.flush()
            rates.append(len(payloads) / (time.perf_counter() - t0))
            merged = store.query_windows("mlp", "1.0.0")
            assert merged is not None and merged.requests == len(payloads)
            assert len(store.windows("mlp", "1.0.0")) == INTERVALS
            store.close()
    signed = _signed(prof, payloads)
    return {
        **signed,
        "ingest_reports_per_s": float(max(rates)),
        "ingest_reports_per_s_median": float(np.median(rates)),
        "decode_only_reports_per_s": len(payloads) / decode_s,
        "ingest_report_bytes_mean": float(np.mean([len(p) for p in payloads])),
    }


def _signed(prof: ReferenceProfile, payloads: list[bytes]) -> dict[str, float]:
    """Sign every report as its device, then time check + ingest, and the check alone (best of 3)."""
    per_device = len(payloads) // DEVICES
    devices = [f"device-{i // per_device:04d}" for i in range(len(payloads))]
    signer = LoadSigner()
    t0 = time.perf_counter()
    headers = [signer.header(dev, "telemetry", p) for dev, p in zip(devices, payloads, strict=True)]
    sign_s = time.perf_counter() - t0
    topics = Topics("bench")
    messages = [Message(topics.telemetry(dev), p, user_properties=((HEADER, h),))
                for dev, p, h in zip(devices, payloads, headers, strict=True)]
    full: list[float] = []
    check: list[float] = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            for timed, out in ((True, full), (False, check)):
                fleet = Store(Path(tmp) / f"fleet-{timed}.db")
                for dev in sorted(set(devices)):
                    fleet.devices.create(dev, {}, {}, dev, "-", "bench")
                    fleet.report_keys.register(dev, sim_device_public_key(dev), "bench", audited=False)
                gate = ReportVerifier(fleet.report_keys, "bench")
                store = TelemetryStore(Path(tmp) / f"telemetry-{timed}.db",
                                       IngestConfig(window_s=60.0, flush_every=1000),
                                       profiles=lambda m, v: prof, clock=lambda: 1_700_010_000.0)
                t0 = time.perf_counter()
                passed = 0
                for m in messages:
                    if gate(m):
                        passed += 1
                        if timed:
                            store.ingest(m.payload)
                store.flush()
                out.append(len(messages) / (time.perf_counter() - t0))
                assert passed == len(messages) and sum(gate.refused().values()) == 0
                assert all(gate(m) is False for m in messages[:10])  # replays: refused
                store.close()
                fleet.close()
    return {
        "sign_us_per_report": sign_s / len(payloads) * 1e6,
        "ingest_verified_reports_per_s": float(max(full)),
        "verify_reports_per_s": float(max(check)),
    }

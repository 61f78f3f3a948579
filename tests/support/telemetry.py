"""Real telemetry for the fleet telemetry tests (not a conftest: imported explicitly).

Reports are built the way devices build them (`TelemetrySketch` over real arrays, then
`encode_report`), with drift injected by shifting chosen columns; bundles are built and
published for real (`build_bundle`, TUF repository, `publish_bundle`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.components import ensure_trust
from fleet.db.database import Database
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.profile import compute_reference_profile
from fleet.registry.publish import publish_bundle
from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights

T0 = 1_800_000_000.0  # a multiple of 60: windows start at T0 + 60 k
MLP_FEATURES = [f"feat{i}" for i in range(32)]
MLP_REFERENCE = np.random.default_rng(5).standard_normal((3000, 32)).astype(np.float32)


def sum_outputs(x: np.ndarray) -> np.ndarray:
    return np.asarray(x.sum(axis=1))


def difference_output(x: np.ndarray) -> np.ndarray:
    """a - b: unchanged when both shift by the same amount (data drift without prediction drift)."""
    return np.asarray(x[:, 0] - x[:, 1])


def small_profile(outputs: Callable[[np.ndarray], np.ndarray] = sum_outputs, seed: int = 11
                  ) -> ReferenceProfile:
    """Four numeric features a..d and one output `outputs(x)`."""
    ref = np.random.default_rng(seed).normal(size=(6000, 4))
    return compute_reference_profile(ref, list("abcd"), outputs=outputs(ref))


def mlp_outputs(x: np.ndarray) -> np.ndarray:
    return np.asarray(mlp_reference(x.astype(np.float32), mlp_weights(0)))


def encoded_reports(
    profile: ReferenceProfile,
    model: str,
    version: str,
    cohort: str,
    devices: int,
    shifts: Sequence[np.ndarray | float],
    outputs: Callable[[np.ndarray], np.ndarray] = sum_outputs,
    rows: int = 700,
    seed: int = 0,
    start: float = T0,
) -> list[bytes]:
    """One report per device per window: window k (starting at `start + 60 k`, k >= 1) holds
    `rows` rows per device drawn from N(shifts[k - 1], 1) per column."""
    rng = np.random.default_rng(seed)
    n_cols = len(profile.features)
    out: list[bytes] = []
    for d in range(devices):
        ticks = iter([start + 60.0 * i + 1.0 for i in range(len(shifts) + 1)])
        sketch = TelemetrySketch(profile, f"{model}-{version}-{cohort}-{d}", model, version, cohort=cohort,
                                 clock=ticks.__next__, resource_probe=lambda: (0, 0.0, 0.0))
        for shift in shifts:
            x = rng.normal(0.0, 1.0, size=(rows, n_cols)) + np.asarray(shift)
            sketch.update(x, outputs(x), 0.002)
            out.append(encode_report(sketch.snapshot_and_reset()))
    return out


def stored_reports(telemetry: Database) -> tuple[int, int]:
    """(reports claimed in `telemetry_seen`, reports merged into the windows) of a telemetry
    database: equal, and equal to what was sent, when every report was stored exactly once."""
    with telemetry.read() as db:
        seen = int(db.scalar("SELECT COUNT(*) FROM telemetry_seen") or 0)
        merged = int(db.scalar("SELECT COALESCE(SUM(reports), 0) FROM telemetry_windows") or 0)
    return seen, merged


def column_shift(n_cols: int, columns: Sequence[int], amount: float) -> np.ndarray:
    shift = np.zeros(n_cols)
    shift[list(columns)] = amount
    return shift


def publish_mlp(settings: FleetSettings, store: Store, version: str, tmp: Path,
                reference: np.ndarray = MLP_REFERENCE) -> ReferenceProfile:
    """Build the 32-64-64-4 MLP bundle with a 20-bin reference profile and publish it as
    `mlp:<version>` (TUF target + registry row); returns the bundle's reference profile."""
    model = tmp / f"mlp-{version}.onnx"
    model.write_bytes(make_mlp_onnx(0))
    meta = BundleMetadata(name="mlp", version=version, feature_names=MLP_FEATURES, bins=20)
    bundle = build_bundle(model, meta, tmp / f"mlp-{version}.efb", reference_data=reference)
    _, repo = ensure_trust(settings)
    publish_bundle(store, repo, bundle, "mlp", "test")
    from agent.contract.bundle import read_manifest

    return read_manifest(bundle).reference_profile


class WebhookRecorder(BaseHTTPRequestHandler):
    """Records every JSON body POSTed to it; answers `status` (set it to test failed delivery)."""

    received: list[dict[str, object]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def webhook_server(path: str) -> Iterator[tuple[str, type[WebhookRecorder]]]:
    """A real local HTTP webhook receiver: yields its URL (ending in `path`) and its recorder class."""
    handler = type("Hook", (WebhookRecorder,), {"received": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", handler
    finally:
        server.shutdown()
        server.server_close()

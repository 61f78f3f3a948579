"""Micro-batching on the Unix socket (agent/serving/batch_loop.py) over a real socket and MLP.

Batches are made deterministic with a gate: the first request blocks inside the model while
the others are already in the kernel's socket buffers, so the next turn of the loop finds
them all and must run them as one batch.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InputValidationError, MisuseError
from agent.inference_client import InferenceClient
from agent.runtimes import load_model
from agent.runtimes.base import LoadedModel
from agent.serving.api import ApiLimits, PredictorSlot
from agent.serving.batch_run import BatchConfig, batchable
from agent.serving.efi1 import FRAME, encode_frame
from agent.serving.unix_server import UnixInferenceServer
from agent.telemetry.feedback import PredictionLog
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights
from tests.support.serving_wire import HEADER, recv_exact

pytestmark = pytest.mark.integration

X = np.random.default_rng(11).standard_normal((16, 32)).astype(np.float32)
REF = mlp_reference(X, mlp_weights(0))


class Gated:
    """A predictor whose first call waits for `release`; counts calls and rows per call."""

    def __init__(self, model: Any, refuse_nan: bool = False, fixed_output: bool = False) -> None:
        self.model = model
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[int] = []
        self.refuse_nan = refuse_nan
        self.fixed_output = fixed_output

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        self.calls.append(int(inputs["x"].shape[0]))
        if self.refuse_nan and np.isnan(inputs["x"]).any():
            raise InputValidationError("input 'x': NaN is not allowed")
        out: dict[str, np.ndarray] = self.model.predict(inputs)
        if self.fixed_output:  # one summary row whatever the batch: not splittable by rows
            return {"logits": out["logits"].sum(axis=0, keepdims=True)}
        return out

    def info(self) -> dict[str, Any]:
        return dict(self.model.info())


class Sink:
    """A feedback sink over a real `PredictionLog` (ids are consecutive per call)."""

    def __init__(self) -> None:
        self.log = PredictionLog(epoch="abcd0123")

    def record(self, model: dict[str, Any], outputs: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray] | None = None) -> list[str] | None:
        return self.log.record("b", outputs["logits"].argmax(axis=1))

    def submit(self, items: list[tuple[object, object]]) -> dict[str, int]:
        return self.log.match(items).counts()


@pytest.fixture
def model() -> Iterator[LoadedModel]:
    d = Path(tempfile.mkdtemp(prefix="ef-batch-", dir="/tmp"))
    data = make_mlp_onnx(0)
    (d / "m.onnx").write_bytes(data)
    yield load_model(d / "m.onnx", mlp_manifest(data))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sockpath() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ef-batch-", dir="/tmp"))
    yield d / "b.sock"
    shutil.rmtree(d, ignore_errors=True)


def _request(x: np.ndarray) -> bytes:
    desc = struct.pack("<BBH", 1, 2, 1) + struct.pack("<2I", *x.shape) + b"x"
    payload = x.astype(np.float32).tobytes()
    return struct.pack(HEADER, b"EFB1", 1, 0, 0, 1, 0, 0, len(desc), len(payload)) + desc + payload


_recv_exact = recv_exact


def _reply(s: socket.socket) -> tuple[int, bytes, np.ndarray | None]:
    """status, meta and the outputs (None for an error frame) of one reply."""
    fields = struct.unpack(HEADER, _recv_exact(s, struct.calcsize(HEADER)))
    kind, status, meta_len, desc_len, payload_len = fields[1], fields[3], fields[6], fields[7], fields[8]
    meta, desc, payload = _recv_exact(s, meta_len), _recv_exact(s, desc_len), _recv_exact(s, payload_len)
    if kind == 3:
        return status, meta, None
    rows, cols = struct.unpack_from("<2I", desc, 4)
    return status, meta, np.frombuffer(payload, np.float32).reshape(rows, cols)


def _connect(path: Path) -> socket.socket:
    """A connection the server has accepted (a health call answered on it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(encode_frame({"op": "health"}))
    prefix = _recv_exact(s, FRAME.size)
    head_len, payload_len = struct.unpack("!II", prefix[4:])
    assert b'"ready":true' in _recv_exact(s, head_len + payload_len)
    return s


def _gated_batch(
    srv: UnixInferenceServer, gate: Gated, parts: list[np.ndarray]
) -> list[tuple[int, bytes, Any]]:
    """Send `parts[0]` (held in the model by the gate), then the rest on their own connections,
    release the gate and return every reply in order."""
    socks = [_connect(srv.path) for _ in parts]
    try:
        socks[0].sendall(_request(parts[0]))
        assert gate.entered.wait(10)
        for s, x in zip(socks[1:], parts[1:], strict=True):
            s.sendall(_request(x))
        gate.release.set()
        return [_reply(s) for s in socks]
    finally:
        for s in socks:
            s.close()


def test_concurrent_requests_run_as_one_batch_with_the_unbatched_results(
    model: LoadedModel, sockpath: Path
) -> None:
    gate = Gated(model)
    sink = Sink()
    parts = [X[0:1], X[1:2], X[2:5], X[5:6], X[6:8]]
    with UnixInferenceServer(gate, sockpath, feedback=sink, batching=BatchConfig()) as srv:
        replies = _gated_batch(srv, gate, parts)
        assert srv.loop is not None and (srv.loop.batches, srv.loop.batched_requests) == (1, 4)
    assert gate.calls == [1, 7]  # the held request alone, then the four others in one run
    at = 0
    firsts = []
    for (status, meta, out), x in zip(replies, parts, strict=True):
        assert status == 200 and out is not None
        np.testing.assert_allclose(out, REF[at:at + len(x)], atol=1e-5)  # the same as unbatched
        count, n, v, i = struct.unpack_from("<IHHH", meta)
        assert count == len(x)
        firsts.append(int(meta[10 + n + v:10 + n + v + i].decode().rpartition("-")[2]))
        at += len(x)
    assert firsts == [0, 1, 2, 5, 6]  # each request's own ids: consecutive rows of the batch


def test_max_rows_splits_a_batch_and_the_client_api_is_unchanged(model: LoadedModel, sockpath: Path) -> None:
    gate = Gated(model)
    parts = [X[0:1]] + [X[i:i + 2] for i in range(1, 13, 2)]
    with UnixInferenceServer(gate, sockpath, batching=BatchConfig(max_rows=4)) as srv:
        replies = _gated_batch(srv, gate, parts)
        with InferenceClient(srv.path) as client:  # the same client, nothing to opt in to
            np.testing.assert_allclose(client.predict({"x": X[:3]})["logits"], REF[:3], atol=1e-5)
    assert gate.calls[:4] == [1, 4, 4, 4]
    at = 0
    for (status, _, out), x in zip(replies, parts, strict=True):
        assert status == 200
        np.testing.assert_allclose(out, REF[at:at + len(x)], atol=1e-5)
        at += len(x)


def test_a_failing_batch_is_rerun_one_by_one_so_only_the_bad_request_fails(
    model: LoadedModel, sockpath: Path
) -> None:
    gate = Gated(model, refuse_nan=True)
    bad = X[3:4].copy()
    bad[0, 5] = np.nan
    parts = [X[0:1], X[1:2], bad, X[2:3]]
    with UnixInferenceServer(gate, sockpath, batching=BatchConfig()) as srv:
        replies = _gated_batch(srv, gate, parts)
    assert gate.calls == [1, 3, 1, 1, 1]  # the batch failed, then each alone
    assert [r[0] for r in replies] == [200, 200, 400, 200]
    assert b"NaN is not allowed" in replies[2][1]
    np.testing.assert_allclose(replies[3][2], REF[2:3], atol=1e-5)


def test_outputs_that_are_not_per_row_are_never_split(model: LoadedModel, sockpath: Path) -> None:
    gate = Gated(model, fixed_output=True)
    parts = [X[0:1], X[1:3], X[3:6]]
    with UnixInferenceServer(gate, sockpath, batching=BatchConfig()) as srv:
        replies = _gated_batch(srv, gate, parts)
    assert gate.calls == [1, 5, 2, 3]  # the stacked run's one row cannot be split: each alone
    at = 0
    for (status, _, out), x in zip(replies, parts, strict=True):
        assert status == 200 and out is not None and out.shape == (1, 4)
        np.testing.assert_allclose(out, REF[at:at + len(x)].sum(axis=0, keepdims=True), atol=1e-4)
        at += len(x)


def test_a_swap_between_batches_is_seen_by_the_next_batch(model: LoadedModel, sockpath: Path) -> None:
    d = sockpath.parent
    data = make_mlp_onnx(1)
    (d / "m1.onnx").write_bytes(data)
    newer = load_model(d / "m1.onnx", mlp_manifest(data, version="2.0.0"))
    gate = Gated(model)
    slot = PredictorSlot(gate)
    with UnixInferenceServer(slot, sockpath, batching=BatchConfig()) as srv:
        socks = [_connect(srv.path) for _ in range(3)]
        socks[0].sendall(_request(X[0:1]))
        assert gate.entered.wait(10)
        for s in socks[1:]:
            s.sendall(_request(X[1:2]))
        slot.set(newer)  # swapped while a request runs and two wait to be batched
        gate.release.set()
        replies = [_reply(s) for s in socks]
        for s in socks:
            s.close()
    versions = [m[10 + struct.unpack_from("<IHHH", m)[1]:][:5] for _, m, _ in replies]
    assert versions == [b"1.0.0", b"2.0.0", b"2.0.0"]  # the running request kept its model
    np.testing.assert_allclose(replies[0][2], REF[0:1], atol=1e-5)
    np.testing.assert_allclose(replies[1][2], mlp_reference(X[1:2], mlp_weights(1)), atol=1e-5)


def test_a_client_dying_mid_batch_does_not_hurt_the_others(model: LoadedModel, sockpath: Path) -> None:
    gate = Gated(model)
    with UnixInferenceServer(gate, sockpath, ApiLimits(max_connections=8), batching=BatchConfig()) as srv:
        held, quitter, half, ok = (_connect(srv.path) for _ in range(4))
        held.sendall(_request(X[0:1]))
        assert gate.entered.wait(10)
        quitter.sendall(_request(X[1:2]))
        quitter.close()  # gone before its reply is sent
        half.sendall(_request(X[2:3])[:30])
        half.close()  # gone mid-frame
        ok.sendall(_request(X[3:4]))
        gate.release.set()
        assert _reply(held)[0] == 200
        status, _, out = _reply(ok)
        assert status == 200
        np.testing.assert_allclose(out, REF[3:4], atol=1e-5)
        for s in (held, ok):
            s.close()
        with InferenceClient(srv.path) as client:  # still serving, connections were released
            for _ in range(10):
                np.testing.assert_allclose(client.predict({"x": X[:2]})["logits"], REF[:2], atol=1e-5)
            assert client.health()["ready"] is True


def test_models_with_a_fixed_batch_dimension_are_not_batched(model: LoadedModel) -> None:
    info = model.info()
    assert batchable(model) is True
    fixed = {**info, "inputs": [{**info["inputs"][0], "shape": [1, 32]}]}

    class Fixed:
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return model.predict(inputs)

        def info(self) -> dict[str, Any]:
            return fixed

    assert batchable(Fixed()) is False
    with pytest.raises(MisuseError):
        BatchConfig(window_us=-1)
    with pytest.raises(MisuseError):
        BatchConfig(max_rows=0)

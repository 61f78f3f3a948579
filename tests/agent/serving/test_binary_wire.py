"""The binary EFB1 predict frame over a real Unix socket and a real MLP: the documented byte
layout spoken with nothing but `socket` and `struct`, its bad paths, pipelining, large frames,
and concurrent clients across swaps and rollbacks of the daemon's holder; each served both
by a thread per connection (the default) and by the micro-batching event loop."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.daemon.served_model import ServedModel
from agent.daemon.serving import ModelCatalog
from agent.errors import InputValidationError, RequestTooLargeError
from agent.inference_client import InferenceClient
from agent.runtimes import load_model
from agent.serving.api import ApiLimits, PredictorSlot
from agent.serving.batch_run import BatchConfig
from agent.serving.client import UnixInferenceClient
from agent.serving.model_holder import ModelHolder
from agent.serving.shm_layout import supported as shm_supported
from agent.serving.shm_server import ShmConfig
from agent.serving.unix_server import UnixInferenceServer
from simulators.models import mlp_reference, mlp_weights
from tests.support.serving_wire import FLOAT, HEADER, mlp_file, read_reply, recv_exact, socket_dir

pytestmark = pytest.mark.integration

X = np.random.default_rng(5).standard_normal((8, 32)).astype(np.float32)
REF = mlp_reference(X, mlp_weights(0))
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_batch=1000, max_connections=32, idle_timeout_s=10)

@pytest.fixture
def sockdir() -> Iterator[Path]:
    with socket_dir("ef-wire-") as d:
        yield d


_model = mlp_file


@pytest.fixture(params=[None, BatchConfig(), BatchConfig(window_us=200, max_rows=8)],
                ids=["threads", "batching", "batching-window"])
def batching(request: pytest.FixtureRequest) -> BatchConfig | None:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server(sockdir: Path, batching: BatchConfig | None) -> Iterator[UnixInferenceServer]:
    path, manifest = _model(sockdir)
    with UnixInferenceServer(PredictorSlot(load_model(path, manifest)), sockdir / "w.sock", LIMITS,
                             batching=batching) as srv:
        yield srv


def _request(rows: list[list[float]], name: str = "x", code: int = FLOAT) -> bytes:
    dims = (len(rows), len(rows[0]))
    raw = name.encode()
    desc = struct.pack("<BBH", code, 2, len(raw)) + struct.pack("<2I", *dims) + raw
    payload = b"".join(struct.pack(f"<{len(r)}f", *r) for r in rows)
    return struct.pack(HEADER, b"EFB1", 1, 0, 0, 1, 0, 0, len(desc), len(payload)) + desc + payload


_recv_exact, _reply = recv_exact, read_reply


def _error(meta: bytes) -> tuple[str, str]:
    code_len, msg_len = struct.unpack_from("<HH", meta)
    return meta[4:4 + code_len].decode(), meta[4 + code_len:4 + code_len + msg_len].decode()


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def test_raw_socket_and_struct_speak_the_documented_frame(server: UnixInferenceServer) -> None:
    with _connect(server.path) as s:
        for rows in (1, 3):
            s.sendall(_request(X[:rows].tolist()))
            kind, flags, status, meta, desc, payload = _reply(s)
            assert (kind, flags, status) == (2, 0, 200)
            count, n_len, v_len, id_len = struct.unpack_from("<IHHH", meta)
            text = meta[10:]
            assert text[:n_len] == b"mlp" and text[n_len:n_len + v_len] == b"1.0.0"
            assert (count, id_len) == (0, 0)  # no feedback sink: predictions are not tracked
            code, ndim, name_len = struct.unpack_from("<BBH", desc)
            dims = struct.unpack_from(f"<{ndim}I", desc, 4)
            assert (code, dims, desc[4 + 4 * ndim:4 + 4 * ndim + name_len]) == (FLOAT, (rows, 4), b"logits")
            got = np.array(struct.unpack(f"<{rows * 4}f", payload)).reshape(rows, 4)
            np.testing.assert_allclose(got, REF[:rows], atol=1e-5)


def test_bad_frames_get_error_frames_and_the_server_keeps_serving(server: UnixInferenceServer) -> None:
    good = _request(X[:1].tolist())
    raw = b"x"
    bad_dtype = struct.pack("<BBH", 99, 2, 1) + struct.pack("<2I", 1, 32) + raw
    survivable = [
        # (frame, status, code, message): read whole, so the connection stays usable after it
        (struct.pack(HEADER, b"EFB1", 1, 0, 0, 1, 0, 0, len(bad_dtype), 128) + bad_dtype + bytes(128),
         400, "bad_request", "unknown dtype code 99"),
        (good[:-4], None, None, None),  # placeholder replaced below (size mismatch)
        (_request(X[:1, :31].tolist()), 400, "invalid_input", "expected shape [?, 32], got [1, 31]"),
        (_request(X[:1].tolist(), name="y"), 400, "invalid_input", "missing input(s) ['x']"),
    ]
    desc = struct.pack("<BBH", FLOAT, 2, 1) + struct.pack("<2I", 1, 32) + raw
    survivable[1] = (struct.pack(HEADER, b"EFB1", 1, 0, 0, 1, 0, 0, len(desc), 124) + desc + bytes(124),
                     400, "bad_request", "payload is 124 bytes, the descriptors need 128")
    with _connect(server.path) as s:
        for frame, status, code, message in survivable:
            s.sendall(frame)
            kind, flags, got_status, meta, _, _ = _reply(s)
            got_code, got_message = _error(meta)
            assert (kind, flags, got_status, got_code) == (3, 0, status, code)
            assert message is not None and message in got_message
            s.sendall(good)  # the same connection still serves
            assert _reply(s)[2] == 200
    fatal = [
        # (frame, status, message, half-close after sending): the stream cannot be trusted after these
        (struct.pack(HEADER, b"EFB1", 1, 0, 0, 1, 0, 0, 13, 1 << 20), 413, "the limit is 65536", False),
        (struct.pack(HEADER, b"EFB1", 2, 0, 0, 1, 0, 0, 13, 128), 400, "must be kind 1", False),
        (good[:40], 400, "closed mid-frame", True),  # truncated: header promises more than arrives
    ]
    for frame, status, message, half_close in fatal:
        with _connect(server.path) as s:
            s.sendall(frame)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            kind, flags, got_status, meta, _, _ = _reply(s)
            assert (kind, flags & 1, got_status) == (3, 1, status)
            assert message in _error(meta)[1]
            assert s.recv(1) == b""  # the server closed it
    with _connect(server.path) as s:  # garbage: not a frame of either kind; EFI1 JSON error, closed
        s.sendall(bytes(range(64)))
        assert s.recv(4) == b"EFI1"
    with _connect(server.path) as s:  # closed before a whole header: nothing to answer, no crash
        s.sendall(good[:10])
    with InferenceClient(server.path) as client:
        np.testing.assert_allclose(client.predict({"x": X[:2]})["logits"], REF[:2], atol=1e-5)


def test_client_maps_error_frames_and_survives_them(server: UnixInferenceServer) -> None:
    with UnixInferenceClient(server.path) as client:
        with pytest.raises(InputValidationError, match=r"got \[1, 31\]"):
            client.predict({"x": X[:1, :31]})
        with pytest.raises(RequestTooLargeError):
            client.predict({"x": np.zeros((1001, 32), np.float32)})
        wide = client.predict({"x": X[:1].astype(np.float64)})["logits"]  # cast on the server when safe
        np.testing.assert_allclose(wide, REF[:1], atol=1e-5)
        assert client.health()["ready"] is True  # JSON frames on the same connection
        assert client.last_model == {"name": "mlp", "version": "1.0.0"}
    with InferenceClient(server.path, spin_us=300) as polling:  # polls for replies before sleeping
        for rows in (1, 4):
            np.testing.assert_allclose(polling.predict({"x": X[:rows]})["logits"], REF[:rows], atol=1e-5)
        with pytest.raises(InputValidationError):
            polling.predict({"x": X[:1, :31]})


def test_pipelined_and_large_frames(sockdir: Path, batching: BatchConfig | None) -> None:
    path, manifest = _model(sockdir)
    big = ApiLimits(max_body_bytes=1 << 20, max_batch=5000)
    x = np.random.default_rng(9).standard_normal((3000, 32)).astype(np.float32)  # 384 KB: over the buffer
    with UnixInferenceServer(load_model(path, manifest), sockdir / "b.sock", big, batching=batching) as srv:
        with _connect(srv.path) as s:
            s.sendall(_request(X[:1].tolist()) + _request(X[:2].tolist()))  # two frames in one write
            assert struct.unpack_from("<2I", _reply(s)[4], 4) == (1, 4)
            assert struct.unpack_from("<2I", _reply(s)[4], 4) == (2, 4)
        with InferenceClient(srv.path) as client:
            out = client.predict({"x": x})["logits"]
            np.testing.assert_allclose(out, mlp_reference(x, mlp_weights(0)), atol=1e-4)
            np.testing.assert_allclose(client.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_concurrent_clients_across_swaps_and_rollbacks_never_fail(
    sockdir: Path, batching: BatchConfig | None, shm: bool
) -> None:
    catalog = ModelCatalog(threads=1)
    holder = ModelHolder()
    p0, m0 = _model(sockdir, 0, "1.0.0")
    p1, m1 = _model(sockdir, 1, "2.0.0")
    holder.swap(catalog.load(p0, m0, 1), "mlp-1.0.0", keep_previous=False)
    refs = {"1.0.0": REF, "2.0.0": mlp_reference(X, mlp_weights(1))}
    failures: list[str] = []
    counts: list[int] = []
    stop = threading.Event()
    # shm: channels served in this process (the poller's same_process switch), clients that
    # never spin, so the test's threads and the poller do not fight for the GIL.
    channel = ShmConfig(spin_us=200, same_process=True) if shm else None
    with UnixInferenceServer(ServedModel(holder, catalog, None), sockdir / "c.sock", LIMITS,
                             batching=batching, shm=channel) as srv:

        def hammer(rows: int) -> None:
            n = 0
            with InferenceClient(srv.path, shm_spin_us=0) as client:
                while not stop.is_set() or n < 20:
                    try:
                        got = client.predict({"x": X[:rows]})["logits"]
                        version = client.last_model["version"]
                        if not np.allclose(got, refs[version][:rows], atol=1e-5):
                            failures.append(f"wrong outputs for {version}")
                        if client.on_shared_memory != (shm and shm_supported()):
                            failures.append(f"on shared memory: {client.on_shared_memory}")
                    except Exception as exc:  # any failed request is the bug this test is for
                        failures.append(repr(exc))
                    n += 1
            counts.append(n)

        threads = [threading.Thread(target=hammer, args=(1 + i % 3,)) for i in range(8)]
        for t in threads:
            t.start()
        for _ in range(5):
            holder.swap(catalog.load(p1, m1, 1), "mlp-2.0.0", keep_previous=True)
            assert holder.revert()  # rollback: the standby serves again
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert len(counts) == 8 and min(counts) >= 20


def test_idle_connections_are_closed_by_the_kernel_timeout(
    sockdir: Path, batching: BatchConfig | None
) -> None:
    path, manifest = _model(sockdir)
    limits = ApiLimits(idle_timeout_s=0.3)
    model = load_model(path, manifest)
    with UnixInferenceServer(model, sockdir / "i.sock", limits, batching=batching) as srv:
        with _connect(srv.path) as s:
            s.sendall(_request(X[:1].tolist()))
            assert _reply(s)[2] == 200
            s.settimeout(10)
            assert s.recv(1) == b""  # closed after 0.3 s idle (the recv would otherwise wait 10 s)
        with InferenceClient(srv.path) as client:  # the server itself is fine
            assert client.predict({"x": X[:1]})["logits"].shape == (1, 4)

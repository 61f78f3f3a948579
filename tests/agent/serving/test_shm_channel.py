"""The shared-memory channel (EFS1) with a real MLP: what a client gets, what a hostile or
broken peer gets, and the lifecycle of a channel (fallbacks, closes, idle timeouts, a stopped
server, stacked runs; swaps under load are in test_binary_wire.py, on both transports).
Served in this process with `same_process=True` and clients that never spin
(`shm_spin_us=0`), so the GIL is not fought over; one test runs the server in another
process with the defaults, spinning on both sides."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InputValidationError, MessageError, MisuseError, RequestTooLargeError, TransportError
from agent.inference_client import InferenceClient
from agent.runtimes import load_model
from agent.serving import shm_layout, wire
from agent.serving.api import ApiLimits, PredictorSlot
from agent.serving.batch_run import BatchConfig
from agent.serving.efi1 import encode_frame
from agent.serving.shm_client import ShmLink
from agent.serving.shm_layout import Geometry, write_parts
from agent.serving.shm_server import ShmConfig
from agent.serving.unix_server import UnixInferenceServer
from simulators.models import mlp_reference, mlp_weights
from tests.support.serving_wire import mlp_file, socket_dir

# The channel exists on x86-64 Linux only (agent/serving/shm_layout.py); CI runs there, so
# these never skip in CI. The socket fallback elsewhere is what test_binary_wire.py covers.
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shm_layout.supported(), reason="shared memory is x86-64 Linux only")]

X = np.random.default_rng(7).standard_normal((8, 32)).astype(np.float32)
REF = mlp_reference(X, mlp_weights(0))
LIMITS = ApiLimits(max_body_bytes=256 * 1024, max_batch=1000, max_connections=16, idle_timeout_s=10)
SHM = ShmConfig(spin_us=200, same_process=True)
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def d() -> Iterator[Path]:
    with socket_dir("ef-shm-") as path:
        yield path


_model = mlp_file


def _server(d: Path, shm: ShmConfig | None = SHM, limits: ApiLimits = LIMITS,
            batching: BatchConfig | None = None, predictor: Any = None) -> UnixInferenceServer:
    if predictor is None:
        predictor = PredictorSlot(load_model(*_model(d)))
    return UnixInferenceServer(predictor, d / "s.sock", limits, batching=batching, shm=shm)


def _client(path: Path, **kw: Any) -> InferenceClient:
    return InferenceClient(path, shm_spin_us=0, **kw)


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_predicts_go_through_shared_memory_and_match_the_socket(d: Path) -> None:
    with _server(d) as srv, _client(srv.path) as c, _client(srv.path, transport="socket") as plain:
        for rows in (1, 3, 8, 1):
            got = c.predict({"x": X[:rows]})["logits"]
            np.testing.assert_allclose(got, REF[:rows], atol=1e-5)
            np.testing.assert_array_equal(got, plain.predict({"x": X[:rows]})["logits"])
        assert c.on_shared_memory and not plain.on_shared_memory
        assert c.last_model == {"name": "mlp", "version": "1.0.0"}
        assert c.info()["name"] == "mlp" and c.health()["ready"] is True  # JSON ops beside it
        assert srv.shm is not None and srv.shm.poller.requests == 4


def test_a_repeated_layout_reuses_its_arrays_and_every_request_is_still_checked(d: Path) -> None:
    """The poller keeps one set of input arrays and one reply layout per channel: the values of
    each request must still be its own, and a refused layout must be refused every time."""
    big = np.random.default_rng(2).standard_normal((100, 32)).astype(np.float32)  # outgrows 4 kB
    with _server(d) as srv, _client(srv.path) as c:
        for i in range(8):  # the same layout, new values each time
            np.testing.assert_allclose(c.predict({"x": X[i:i + 1]})["logits"], REF[i:i + 1], atol=1e-5)
        for _ in range(2):  # a layout over the row limit, twice in a row
            with pytest.raises(RequestTooLargeError, match="limit is 1000"):
                c.predict({"x": np.zeros((1001, 32), np.float32)})
        got = c.predict({"x": big})["logits"]  # a payload larger than the channel's copy area
        np.testing.assert_allclose(got, mlp_reference(big, mlp_weights(0)), atol=1e-4)
        np.testing.assert_allclose(c.predict({"x": big[:1]})["logits"], got[:1], atol=1e-6)
        mine = c.predict({"x": X[3:4]})["logits"]
        np.testing.assert_allclose(mine, REF[3:4], atol=1e-5)
        mine[:] = 0  # outputs are the caller's arrays, not views of the reply area
        np.testing.assert_allclose(c.predict({"x": X[3:4]})["logits"], REF[3:4], atol=1e-5)
        np.testing.assert_allclose(c.predict({"x": X[5:6]})["logits"], REF[5:6], atol=1e-5)
        assert not mine.any()
        assert c.on_shared_memory and srv.shm is not None and srv.shm.poller.requests == 15


class _CountingSink:
    """Issues consecutive prediction ids from 95, so their length grows (99 -> 100) mid-run."""

    def __init__(self) -> None:
        self.n = 95
        self.issued: list[list[str]] = []

    def record(self, model: dict[str, Any], outputs: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray] | None = None) -> list[str] | None:
        rows = next(iter(outputs.values())).shape[0]
        ids = [f"ep-{self.n + i}" for i in range(rows)]
        self.n += rows
        self.issued.append(ids)
        return ids

    def submit(self, items: list[tuple[object, object]]) -> dict[str, int]:
        return {"matched": 0}


def test_replies_with_prediction_ids_carry_each_requests_own_ids_and_outputs(d: Path) -> None:
    """A reply of the last reply's layout gets only its first id and tensors rewritten (both
    ends): every reply must still carry its own ids, also when an id grows a digit, when the
    row count changes and back, and after an error frame in between."""
    sink = _CountingSink()
    srv = UnixInferenceServer(PredictorSlot(load_model(*_model(d))), d / "s.sock", LIMITS,
                              feedback=sink, shm=SHM)
    with srv, _client(srv.path) as c:
        for i, rows in enumerate((1, 1, 1, 1, 1, 1, 3, 3, 1, 1)):
            x = X[i % 5:i % 5 + rows]
            np.testing.assert_allclose(c.predict({"x": x})["logits"], REF[i % 5:i % 5 + rows], atol=1e-5)
            assert c.last_prediction_ids == sink.issued[-1], i
            if i == 7:
                with pytest.raises(RequestTooLargeError):
                    c.predict({"x": np.zeros((1001, 32), np.float32)})
        assert [len(ids) for ids in sink.issued] == [1] * 6 + [3, 3] + [1, 1]
        assert sink.issued[4] == ["ep-99"] and sink.issued[5] == ["ep-100"]
        assert c.on_shared_memory


def test_a_request_the_link_cannot_hold_is_refused_before_anything_is_written(d: Path) -> None:
    with _server(d) as srv:
        _, link = _raw_link(srv.path)
        desc = wire.describe({"x": X[:1]})
        good = wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, len(desc), X[:1].nbytes) + desc
        huge = np.zeros(link.request_room, np.uint8)
        seq = link.seq
        with pytest.raises(MessageError, match="does not fit"):
            link.call(good, [huge], 0)
        with pytest.raises(MessageError, match="1 tensors for a layout of 0"):
            link.call(b"", [X[:1]], 0)
        assert link.seq == seq  # nothing was sent
        link.call(good, [X[:1]], 0)
        assert wire.HEADER.unpack_from(link.region, link.geo.rep_offset)[1] == wire.KIND_REPLY
        link.close()


def test_bad_inputs_are_refused_and_the_channel_keeps_serving(d: Path) -> None:
    with _server(d) as srv, _client(srv.path) as c:
        with pytest.raises(InputValidationError, match="expected shape"):
            c.predict({"x": np.zeros((1, 3), np.float32)})
        with pytest.raises(RequestTooLargeError, match="limit is 1000"):
            c.predict({"x": np.zeros((1001, 32), np.float32)})
        with pytest.raises(InputValidationError):
            c.predict({"y": X[:1]})
        np.testing.assert_allclose(c.predict({"x": X[:2]})["logits"], REF[:2], atol=1e-5)
        assert c.on_shared_memory


def test_a_frame_larger_than_the_area_goes_over_the_plain_socket(d: Path) -> None:
    big = np.random.default_rng(1).standard_normal((600, 32)).astype(np.float32)  # 76.8 kB
    with _server(d) as srv, _client(srv.path, shm_bytes=4096) as c:
        np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)
        got = c.predict({"x": big})["logits"]
        np.testing.assert_allclose(got, mlp_reference(big, mlp_weights(0)), atol=1e-4)
        assert c.on_shared_memory and c.last_model["version"] == "1.0.0"
        np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)


def test_a_server_without_shared_memory_keeps_the_client_on_the_socket(d: Path) -> None:
    with _server(d, shm=None) as srv:
        with _client(srv.path) as c:
            np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)
            assert not c.on_shared_memory
        with _client(srv.path, transport="shm") as strict:
            with pytest.raises(TransportError, match="does not offer"):
                strict.predict({"x": X[:1]})
    with pytest.raises(MisuseError):
        InferenceClient(d / "x.sock", transport="pigeon")


def test_a_client_in_the_servers_own_process_stays_on_the_socket_by_default(d: Path) -> None:
    with _server(d, shm=ShmConfig()) as srv, InferenceClient(srv.path) as c:
        np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)
        assert not c.on_shared_memory  # the poller and this thread would fight for the GIL


def _raw_link(path: Path, **sizes: Any) -> tuple[socket.socket, ShmLink]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(10)
    link = ShmLink.open(s, sizes.get("req", 8192), sizes.get("rep", 8192))
    assert link is not None
    return s, link


def _error_of(link: ShmLink) -> tuple[int, str]:
    at = link.geo.rep_offset
    fields = wire.HEADER.unpack_from(link.region, at)
    assert fields[0] == wire.MAGIC and fields[1] == wire.KIND_ERROR
    meta = link.region[at + wire.HEADER.size:at + wire.HEADER.size + fields[6]]
    return fields[3], wire.parse_error_meta(meta)[1]


def test_hostile_bytes_in_the_request_area_get_error_frames_not_a_dead_server(d: Path) -> None:
    with _server(d) as srv:
        _, link = _raw_link(srv.path)
        desc = wire.describe({"x": X[:1]})
        good = wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, len(desc), X[:1].nbytes) + desc
        cases = [
            (b"\xff" * 64, 400, "does not hold an EFB1 frame"),
            (wire.HEADER.pack(wire.MAGIC, 2, 0, 0, 1, 0, 0, len(desc), 128) + desc, 400, "kind 1"),
            (wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, len(desc), 10_000_000) + desc, 413, "limit"),
            (wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, len(desc), 100_000) + desc, 400, "overruns"),
            (wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, len(desc), 64) + desc, 400, "descriptors need"),
            (wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, 4, 0) + b"\x63\x00\x00\x00", 400, "dtype code"),
            (wire.HEADER.pack(wire.MAGIC, 1, 0, 0, 1, 0, 0, 3, 0) + b"\x63\x01\x00", 400, "truncated"),
        ]
        for pre, status, message in cases:
            link.call(pre, [], 0)
            got_status, got_message = _error_of(link)
            assert got_status == status and message in got_message, (got_status, got_message)
        link.call(good, [X[:1]], 0)  # the same channel still serves a good request
        assert wire.HEADER.unpack_from(link.region, link.geo.rep_offset)[1] == wire.KIND_REPLY
        link.close()
        with _client(srv.path) as c:
            np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)


def test_bad_open_requests_are_refused_on_a_socket_that_keeps_working(d: Path) -> None:
    with _server(d) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(srv.path))
        s.settimeout(10)
        for sizes in ({"request_bytes": -5}, {"request_bytes": "big"}, {"reply_bytes": 0}):
            s.sendall(encode_frame({"op": "shm_open", **sizes}))
            reply = s.recv(65536)
            assert b'"status":400' in reply.replace(b" ", b"") and b"positive integer" in reply
        s.sendall(encode_frame({"op": "health"}))
        assert b'"ready":true' in s.recv(65536).replace(b" ", b"")
        s.close()


def test_a_region_that_is_not_efs1_is_refused_by_the_client(d: Path) -> None:
    """A fake agent sends a region without the magic word, then one too small for its geometry."""
    path = d / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(2)
    geo = Geometry.for_request(4096, 4096, 1 << 20)

    def fake() -> None:
        for size in (geo.size, 4096):
            conn, _ = listener.accept()
            conn.recv(65536)
            fd = os.memfd_create("fake")
            os.ftruncate(fd, size)
            socket.send_fds(conn, [encode_frame({"status": 200, "shm": geo.to_doc()})], [fd])
            os.close(fd)
            conn.recv(1)

    t = threading.Thread(target=fake, daemon=True)
    t.start()
    for match in ("not an EFS1 region", "outside the region"):
        with _client(path) as c, pytest.raises(TransportError, match=match):
            c.predict({"x": X[:1]})
    t.join(timeout=10)
    listener.close()


@pytest.mark.parametrize("batching", [None, BatchConfig()], ids=["threads", "batching"])
def test_closing_the_client_frees_the_channel_and_its_connection_slot(
    d: Path, batching: BatchConfig | None
) -> None:
    """A channel holds its connection's slot until it is closed, under either server loop; a
    client that closes and reconnects at once is not refused while the server sees the close
    (a connection over the limit waits `SLOT_WAIT_S` for a slot)."""
    limits = ApiLimits(max_body_bytes=64 * 1024, max_connections=2, idle_timeout_s=10)
    with _server(d, limits=limits, batching=batching) as srv:
        assert srv.shm is not None
        for _ in range(8):  # more channels than slots, one after another, reconnecting at once
            with _client(srv.path) as c:
                c.predict({"x": X[:1]})
                assert c.on_shared_memory
        _wait_for(lambda: srv.shm is not None and srv.shm.poller.channels == 0)
        with _client(srv.path) as a, _client(srv.path) as b:  # two channels take both slots
            a.predict({"x": X[:1]})
            b.predict({"x": X[:1]})
            assert a.on_shared_memory and b.on_shared_memory
            with _client(srv.path, transport="socket") as third:
                with pytest.raises(TransportError, match="too many connections"):
                    third.predict({"x": X[:1]})
        with _client(srv.path) as a, _client(srv.path, transport="socket") as b:
            a.predict({"x": X[:1]})
            b.predict({"x": X[:1]})
            with _client(srv.path) as third, pytest.raises(TransportError, match="too many connections"):
                third.predict({"x": X[:1]})


def test_an_idle_channel_is_closed_and_the_client_reconnects(d: Path) -> None:
    limits = ApiLimits(max_body_bytes=64 * 1024, idle_timeout_s=0.3)
    with _server(d, limits=limits) as srv, _client(srv.path) as c:
        c.predict({"x": X[:1]})
        assert srv.shm is not None
        _wait_for(lambda: srv.shm is not None and srv.shm.poller.channels == 0)  # swept after ~1 s
        with pytest.raises(TransportError):
            c.predict({"x": X[:1]})
        np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)
        assert c.on_shared_memory


class _Slow:
    """Takes longer than any spin, so both sides park and are woken by rings."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return dict(self.inner.predict(inputs))

    def info(self) -> dict[str, Any]:
        return dict(self.inner.info())


def test_parked_sides_are_woken_by_rings_and_a_stopped_server_answers_then_fails(d: Path) -> None:
    slow = _Slow(load_model(*_model(d)), 0.05)
    srv = _server(d, shm=ShmConfig(spin_us=0, same_process=True), predictor=slow).start()
    try:
        with _client(srv.path) as c:
            for _ in range(3):  # the server is parked before each request: the client rings
                time.sleep(0.02)
                np.testing.assert_allclose(c.predict({"x": X[:1]})["logits"], REF[:1], atol=1e-5)
            slow.seconds = 1.0
            got: list[Any] = []
            t = threading.Thread(target=lambda: got.append(c.predict({"x": X[:1]})["logits"]))
            t.start()
            time.sleep(0.2)
            srv.stop()  # the request in flight is answered, then the channel closes
            t.join(timeout=15)
            assert not t.is_alive() and len(got) == 1
            np.testing.assert_allclose(got[0], REF[:1], atol=1e-5)
            with pytest.raises(TransportError):  # the parked/ringing client does not hang
                c.predict({"x": X[:1]})
    finally:
        srv.stop()


def test_with_batching_on_ready_channels_are_stacked_into_one_run(d: Path) -> None:
    slow = _Slow(load_model(*_model(d)), 0.03)
    with _server(d, predictor=slow, batching=BatchConfig()) as srv:
        assert srv.shm is not None and srv.shm.config.stack
        results: dict[int, np.ndarray] = {}

        def one(i: int) -> None:
            with _client(srv.path) as c:
                for _ in range(5):
                    results[i] = c.predict({"x": X[i:i + 1]})["logits"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert srv.shm.poller.stacked_runs >= 1  # while one run sleeps, the others get ready
        for i in range(6):
            np.testing.assert_allclose(results[i], REF[i:i + 1], atol=1e-5)


def test_stacked_replies_carry_each_channels_own_rows_ids_and_errors(d: Path) -> None:
    """Stacked runs write each reply in place (a repeated layout rewrites only its first id
    and tensors): every client must get its own rows and ids, also when row counts change,
    ids grow a digit and a bad request sits in the same pass as good ones."""
    sink = _CountingSink()
    slow = _Slow(load_model(*_model(d)), 0.01)
    srv = UnixInferenceServer(PredictorSlot(slow), d / "s.sock", LIMITS, feedback=sink,
                              batching=BatchConfig(), shm=SHM)
    got: dict[int, list[list[str]]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with _client(srv.path) as c:
                mine: list[list[str]] = []
                for k in range(12):
                    rows = 1 + (k // 4 + i) % 2  # runs of one layout, then the other
                    lo = (i + k) % 6
                    if k % 5 == 4 and i % 2:  # some channels send a bad request now and then
                        with pytest.raises(InputValidationError):
                            c.predict({"x": np.zeros((1, 31), np.float32)})
                    out = c.predict({"x": X[lo:lo + rows]})["logits"]
                    np.testing.assert_allclose(out, REF[lo:lo + rows], atol=1e-5)
                    assert c.last_prediction_ids is not None and len(c.last_prediction_ids) == rows
                    mine.append(list(c.last_prediction_ids))
                got[i] = mine
        except BaseException as exc:  # reported below: a thread's assertion would be lost
            errors.append(exc)

    with srv:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert srv.shm is not None and srv.shm.poller.stacked_runs >= 1
    assert not errors, errors
    issued = [i for batch in sink.issued for i in batch]
    served = [i for mine in got.values() for ids in mine for i in ids]
    assert sorted(served) == sorted(issued) and len(set(served)) == len(served)
    assert "ep-99" in served and "ep-100" in served


def test_a_server_in_another_process_with_the_spinning_defaults(d: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from agent.runtimes import load_model; "
        "from agent.serving.unix_server import UnixInferenceServer; "
        "from simulators.models import make_mlp_onnx, mlp_manifest; d = Path(sys.argv[1]); "
        "data = make_mlp_onnx(0); (d / 'm.onnx').write_bytes(data); "
        "UnixInferenceServer(load_model(d / 'm.onnx', mlp_manifest(data)), d / 'p.sock').start(); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with InferenceClient(d / "p.sock") as c:  # spins for its reply; the poller spins too
            for i in range(200):
                rows = 1 + i % 8
                np.testing.assert_allclose(c.predict({"x": X[:rows]})["logits"], REF[:rows], atol=1e-5)
            assert c.on_shared_memory
            wrong: list[str] = []

            def spinner(k: int) -> None:  # threads of one process each spin, or one for all
                with InferenceClient(d / "p.sock", shm_one_spinner=k % 2 == 1) as mine:
                    for i in range(150):
                        rows = 1 + (i + k) % 8
                        if not np.allclose(mine.predict({"x": X[:rows]})["logits"], REF[:rows], atol=1e-5):
                            wrong.append(f"thread {k} call {i}")
                    if not mine.on_shared_memory:
                        wrong.append(f"thread {k} on the socket")

            threads = [threading.Thread(target=spinner, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads) and wrong == []
            ended: list[str] = []
            running = threading.Barrier(9)

            def until_it_fails(k: int) -> None:  # waiting on each other's spinner when it dies
                with InferenceClient(d / "p.sock", shm_one_spinner=True) as mine:
                    mine.predict({"x": X[:1]})
                    running.wait()
                    try:
                        while True:
                            mine.predict({"x": X[:1]})
                    except TransportError:
                        ended.append(f"thread {k}")

            threads = [threading.Thread(target=until_it_fails, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            running.wait(timeout=30)
            time.sleep(0.2)
            proc.kill()  # the agent dies: every call fails instead of spinning or sleeping forever
            proc.wait(timeout=10)
            for t in threads:
                t.join(timeout=30)
            assert not any(t.is_alive() for t in threads) and len(ended) == 8
            with pytest.raises(TransportError):
                c.predict({"x": X[:1]})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.unit
def test_geometry_and_area_rules() -> None:
    geo = Geometry.for_request(None, 5000, 1 << 20)
    assert geo.req_offset == shm_layout.CONTROL_BYTES and geo.req_size == shm_layout.DEFAULT_AREA_BYTES
    assert geo.rep_size == 8192 and geo.size == geo.rep_offset + 8192
    assert Geometry.for_request(10, 1 << 30, 1 << 16).rep_size == 1 << 16  # capped by the limits
    for bad in (0, -1, 1.5, "1", True):
        with pytest.raises(MessageError):
            Geometry.for_request(bad, None, 1 << 20)
    assert Geometry.from_doc(geo.to_doc(), geo.size) == geo
    for doc in ({**geo.to_doc(), "version": 2}, {"version": 1}, None,
                {**geo.to_doc(), "rep_offset": geo.req_offset}):
        with pytest.raises(MessageError):
            Geometry.from_doc(doc, geo.size)
    with pytest.raises(MessageError, match="outside"):
        Geometry.from_doc(geo.to_doc(), geo.size - 1)
    area = memoryview(bytearray(10))
    assert write_parts(area, [b"abc", np.arange(1, dtype=np.float32).data]) == 7
    with pytest.raises(MessageError, match="does not fit"):
        write_parts(area, [b"x" * 11])
    region = mmap.mmap(-1, 4096)
    words = shm_layout.control_words(region)
    words[shm_layout.W_REQ] = 7
    assert struct.unpack_from("<Q", region, 8)[0] == 7  # word 1, little-endian, as documented
    words.release()
    region.close()

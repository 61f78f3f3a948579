"""The local inference API over real HTTP and Unix-socket servers, with real models."""

from __future__ import annotations

import http.client
import io
import json
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

from agent.errors import (
    InputValidationError,
    MessageError,
    MisuseError,
    NoModelLoadedError,
    RequestTooLargeError,
    RuntimeFailure,
    TransportError,
)
from agent.runtimes import LoadedModel, load_model
from agent.serving.api import ApiLimits, PredictorSlot
from agent.serving.client import HttpInferenceClient, UnixInferenceClient
from agent.serving.http_server import HttpInferenceServer
from agent.serving.unix_server import UnixInferenceServer
from simulators.models import make_mlp_onnx, make_mlp_tflite, mlp_manifest, mlp_reference, mlp_weights

X = np.random.default_rng(11).standard_normal((17, 32)).astype(np.float32)
REF = mlp_reference(X, mlp_weights(0))
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_batch=100, max_connections=16, idle_timeout_s=10)


def _load(directory: Path, seed: int = 0, runtime: str = "onnx", version: str = "1.0.0") -> LoadedModel:
    data = make_mlp_onnx(seed) if runtime == "onnx" else make_mlp_tflite(seed)
    path = directory / f"model-{seed}-{version}.{runtime}"
    path.write_bytes(data)
    return load_model(path, mlp_manifest(data, runtime=runtime, version=version))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="ef-api-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def holder(sockdir: Path) -> PredictorSlot:
    return PredictorSlot(_load(sockdir))


@pytest.fixture
def servers(
    holder: PredictorSlot, sockdir: Path
) -> Iterator[tuple[HttpInferenceServer, UnixInferenceServer]]:
    with (
        HttpInferenceServer(holder, limits=LIMITS) as http_srv,
        UnixInferenceServer(holder, sockdir / "api.sock", limits=LIMITS) as unix_srv,
    ):
        yield http_srv, unix_srv


def _raw(
    port: int, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if body is not None else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_predict_json_npy_and_unix_agree_with_reference(sockdir: Path, runtime: str) -> None:
    model = _load(sockdir, runtime=runtime)
    with HttpInferenceServer(model, limits=LIMITS) as h, UnixInferenceServer(model, sockdir / "s.sock") as u:
        with HttpInferenceClient(port=h.port) as hc, UnixInferenceClient(u.path) as uc:
            for rows in (1, 17):
                np.testing.assert_allclose(hc.predict({"x": X[:rows]})["logits"], REF[:rows], atol=1e-5)
                assert hc.last_model == {"name": "mlp", "version": "1.0.0"}
                out = hc.predict_npy(X[:rows])
                assert isinstance(out, np.ndarray) and out.dtype == np.float32
                np.testing.assert_allclose(out, REF[:rows], atol=1e-5)
                assert hc.last_model == {"name": "mlp", "version": "1.0.0"}
                got = uc.predict({"x": X[:rows]})["logits"]
                assert got.dtype == np.float32 and got.shape == (rows, 4)
                np.testing.assert_allclose(got, REF[:rows], atol=1e-5)
                assert uc.last_model == {"name": "mlp", "version": "1.0.0"}
            assert hc.info()["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 32]}]
            assert uc.info()["runtime"] == runtime
            assert (
                hc.health()
                == uc.health()
                == {"status": "ok", "ready": True, "model": {"name": "mlp", "version": "1.0.0"}}
            )


@pytest.mark.integration
def test_http_bad_requests_get_4xx_with_messages(
    servers: tuple[HttpInferenceServer, UnixInferenceServer],
) -> None:
    port = servers[0].port
    status, doc = _raw(port, "POST", "/v1/predict", b"{not json")
    assert (
        status == 400
        and doc["error"]["code"] == "bad_request"
        and "not valid JSON" in doc["error"]["message"]
    )
    status, doc = _raw(port, "POST", "/v1/predict", b'{"x": [1]}')
    assert status == 400 and '{"inputs"' in doc["error"]["message"]
    status, doc = _raw(
        port, "POST", "/v1/predict", json.dumps({"inputs": {"x": X[:2, :31].tolist()}}).encode()
    )
    assert status == 400 and doc["error"]["code"] == "invalid_input"
    assert "axis 1 is 31, expected 32" in doc["error"]["message"]
    status, doc = _raw(port, "POST", "/v1/predict", json.dumps({"inputs": {"x": [["a"] * 32]}}).encode())
    assert status == 400 and "expected dtype float32" in doc["error"]["message"]
    status, doc = _raw(port, "POST", "/v1/predict", json.dumps({"inputs": {"y": X[:1].tolist()}}).encode())
    assert status == 400 and "missing input(s) ['x']" in doc["error"]["message"]
    status, doc = _raw(port, "POST", "/v1/predict", b"\x93NUMPY garbage", "application/x-npy")
    assert status == 400 and "not a valid .npy" in doc["error"]["message"]
    buf = io.BytesIO()
    np.save(buf, X[:2].astype(np.complex64))
    status, doc = _raw(port, "POST", "/v1/predict", buf.getvalue(), "application/x-npy")
    assert status == 400 and "complex64" in doc["error"]["message"]
    assert _raw(port, "POST", "/v1/predict", b"a=1", "text/plain")[0] == 415
    assert _raw(port, "GET", "/v1/nothing")[0] == 404
    assert _raw(port, "GET", "/v1/predict")[0] == 405


@pytest.mark.integration
def test_limits_give_413(servers: tuple[HttpInferenceServer, UnixInferenceServer]) -> None:
    http_srv, unix_srv = servers
    big = np.random.default_rng(0).standard_normal((50, 100))  # ~100 KB as JSON: over the limit
    status, doc = _raw(
        http_srv.port, "POST", "/v1/predict", json.dumps({"inputs": {"x": big.tolist()}}).encode()
    )
    assert status == 413 and "limit is 65536" in doc["error"]["message"]
    status, doc = _raw(
        http_srv.port, "POST", "/v1/predict", json.dumps({"inputs": {"x": [[0] * 32] * 101}}).encode()
    )
    assert status == 413 and "batch of 101 rows, the limit is 100" in doc["error"]["message"]
    with HttpInferenceClient(port=http_srv.port) as hc:
        with pytest.raises(RequestTooLargeError, match="limit is 100"):
            hc.predict_npy(np.zeros((101, 32), dtype=np.float32))
        assert hc.predict_npy(X[:1]).shape == (1, 4)  # type: ignore[union-attr]
    with UnixInferenceClient(unix_srv.path) as uc:
        with pytest.raises(RequestTooLargeError, match="limit is 100"):
            uc.predict({"x": np.zeros((101, 32), dtype=np.float32)})
        with pytest.raises(RequestTooLargeError, match=r"payload is .* the limit is 65536"):
            uc.predict({"x": np.zeros((100, 200), dtype=np.float32)})
        assert uc.predict({"x": X[:1]})["logits"].shape == (1, 4)  # reconnects after the server closed


@pytest.mark.integration
def test_unix_bad_frames(servers: tuple[HttpInferenceServer, UnixInferenceServer]) -> None:
    path = str(servers[1].path)
    with UnixInferenceClient(path) as uc:
        with pytest.raises(InputValidationError, match=r"'x': expected shape \[\?, 32\], got \[2, 31\]"):
            uc.predict({"x": X[:2, :31]})
        with pytest.raises(MessageError, match="unknown op 'explode'"):
            uc.call({"op": "explode"})
        np.testing.assert_allclose(uc.predict({"x": X[:3]})["logits"], REF[:3], atol=1e-5)  # same connection
    for frame, message in [
        (b"HTTP" + struct.pack("!II", 2, 0) + b"{}", "bad frame magic"),
        (b"EFI1" + struct.pack("!II", 5, 0) + b"{nope", "not valid JSON"),
        (b"EFI1" + struct.pack("!II", 2, 3) + b"{}abc", "3 bytes not described"),
    ]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(frame)
            reply = s.recv(65536)
            head_len = struct.unpack("!4sII", reply[:12])[1]
            doc = json.loads(reply[12 : 12 + head_len])
            assert doc["status"] == 400 and message in doc["error"]["message"]


@pytest.mark.integration
def test_no_model_is_503_then_hot_swap(sockdir: Path) -> None:
    holder = PredictorSlot()
    with HttpInferenceServer(holder) as h, UnixInferenceServer(holder, sockdir / "s.sock") as u:
        status, doc = _raw(
            h.port, "POST", "/v1/predict", json.dumps({"inputs": {"x": X[:1].tolist()}}).encode()
        )
        assert status == 503 and doc["error"]["code"] == "no_model"
        assert _raw(h.port, "GET", "/v1/model")[0] == 503
        with HttpInferenceClient(port=h.port) as hc, UnixInferenceClient(u.path) as uc:
            assert hc.health() == {"status": "ok", "ready": False, "model": None}
            assert uc.health()["ready"] is False
            with pytest.raises(NoModelLoadedError):
                uc.predict({"x": X[:1]})
            with pytest.raises(NoModelLoadedError):
                hc.predict_npy(X[:1])
            holder.set(_load(sockdir, seed=0, version="1.0.0"))
            np.testing.assert_allclose(uc.predict({"x": X[:2]})["logits"], REF[:2], atol=1e-5)
            holder.set(_load(sockdir, seed=1, version="2.0.0"))
            got = hc.predict({"x": X[:2]})["logits"]
            assert hc.last_model["version"] == "2.0.0"
            np.testing.assert_allclose(got, mlp_reference(X[:2], mlp_weights(1)), atol=1e-5)


class _FailingPredictor:
    """A real Predictor whose engine fails: the API must say 500, not blame the request."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeFailure("engine crashed")

    def info(self) -> dict[str, Any]:
        return {
            "name": "broken",
            "version": "0.0.1",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None]}],
        }


@pytest.mark.integration
def test_runtime_failure_is_500(sockdir: Path) -> None:
    with (
        HttpInferenceServer(_FailingPredictor()) as h,
        UnixInferenceServer(_FailingPredictor(), sockdir / "f") as u,
    ):
        status, doc = _raw(h.port, "POST", "/v1/predict", b'{"inputs": {"x": [1.0]}}')
        assert status == 500 and doc["error"] == {"code": "runtime_failure", "message": "engine crashed"}
        with UnixInferenceClient(u.path) as uc, pytest.raises(RuntimeFailure, match="engine crashed"):
            uc.predict({"x": np.ones(1, dtype=np.float32)})


@pytest.mark.integration
def test_concurrent_clients_with_a_swap(
    holder: PredictorSlot, sockdir: Path, servers: tuple[HttpInferenceServer, UnixInferenceServer]
) -> None:
    http_srv, unix_srv = servers
    refs = {"1.0.0": REF, "2.0.0": mlp_reference(X, mlp_weights(1))}
    errors: list[str] = []
    seen: set[str] = set()
    started = threading.Barrier(7)

    def worker(kind: str, rows: int) -> None:
        client: Any = (
            HttpInferenceClient(port=http_srv.port) if kind == "http" else UnixInferenceClient(unix_srv.path)
        )
        with client:
            started.wait()
            for _ in range(40):
                got = client.predict({"x": X[:rows]})["logits"]
                version = client.last_model["version"]
                seen.add(version)
                if not np.allclose(got, refs[version][:rows], atol=1e-5):
                    errors.append(f"{kind} rows={rows} version={version}")

    threads = [threading.Thread(target=worker, args=(k, r)) for k in ("http", "unix") for r in (1, 5, 17)]
    for t in threads:
        t.start()
    started.wait()
    holder.set(_load(sockdir, seed=1, version="2.0.0"))
    for t in threads:
        t.join()
    assert errors == []
    assert "2.0.0" in seen


@pytest.mark.integration
def test_connection_limit_and_socket_path_safety(holder: PredictorSlot, sockdir: Path) -> None:
    with UnixInferenceServer(holder, sockdir / "one.sock", limits=ApiLimits(max_connections=1)) as u:
        with UnixInferenceClient(u.path) as first, UnixInferenceClient(u.path) as second:
            assert first.predict({"x": X[:1]})["logits"].shape == (1, 4)
            with pytest.raises(TransportError, match="too many connections"):
                second.predict({"x": X[:1]})
    assert not (sockdir / "one.sock").exists()
    regular = sockdir / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(MisuseError, match="is not a socket"):
        UnixInferenceServer(holder, regular).start()
    assert regular.read_text() == "keep me"
    with pytest.raises(TransportError, match="cannot connect"):
        UnixInferenceClient(sockdir / "missing.sock").health()

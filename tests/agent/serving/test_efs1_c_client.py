"""A C client written from docs/inference-api.md alone (benchmarks/c/efs1_client.c) talks to
the agent over the shared-memory channel: the protocol description is enough for a non-Python
application. Compiled with the machine's C compiler (CI's image has gcc; without one this
fails rather than skips), served by the real Unix server and MLP."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.runtimes import load_model
from agent.serving import shm_layout
from agent.serving.api import ApiLimits
from agent.serving.shm_server import ShmConfig
from agent.serving.unix_server import UnixInferenceServer
from benchmarks.bench_agent_throughput import build_c_client
from simulators.models import mlp_reference, mlp_weights
from tests.support.serving_wire import mlp_file, socket_dir

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shm_layout.supported(), reason="shared memory is x86-64 Linux only")]

SHM = ShmConfig()  # the agent's defaults: the poller spins 300 µs after a request
X = (np.arange(32, dtype=np.float32) / 100).reshape(1, 32)  # what the C client sends


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("cc") or shutil.which("gcc"), "a C compiler (cc or gcc) is needed for this test"
    built = build_c_client(tmp_path_factory.mktemp("efs1-c"))
    assert built is not None
    return built


@pytest.fixture
def d() -> Iterator[Path]:
    with socket_dir("ef-c-") as path:
        yield path


def _serve(d: Path, shm: ShmConfig | None = SHM) -> UnixInferenceServer:
    return UnixInferenceServer(load_model(*mlp_file(d)), d / "s.sock", ApiLimits(max_connections=16), shm=shm)


def _run(exe: Path, sock: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([str(exe), str(sock), *args], capture_output=True, text=True, timeout=60)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), done.stderr


def test_the_c_client_gets_the_models_outputs_over_shared_memory(exe: Path, d: Path) -> None:
    with _serve(d) as srv:
        rc, out, err = _run(exe, srv.path, "x", "32", "1", "0")
        assert rc == 0, err
        assert out["calls"] == 1 and out["errors"] == 0
        np.testing.assert_allclose(out["first"], mlp_reference(X, mlp_weights(0))[0], atol=1e-5)
        assert srv.shm is not None and srv.shm.poller.requests >= 1  # through the channel, not the socket


def test_a_bad_request_gets_an_error_frame_and_the_channel_stays_usable(exe: Path, d: Path) -> None:
    with _serve(d) as srv:
        rc, out, _ = _run(exe, srv.path, "x", "31", "1", "0")  # 31 features where the model wants 32
        assert rc == 0 and out["errors"] == 1 and out["first"] is None
        assert out["error"].startswith("invalid_input: input 'x': expected shape [?, 32], got [1, 31]")
        rc, out, _ = _run(exe, srv.path, "y", "32", "2", "1")  # an unknown input, 2 threads for 1 s
        assert rc == 0 and out["errors"] == out["calls"] > 1 and out["error"].startswith("invalid_input")


def test_concurrent_c_threads_each_on_their_own_channel(exe: Path, d: Path) -> None:
    with _serve(d) as srv:
        rc, out, err = _run(exe, srv.path, "x", "32", "4", "1")
        assert rc == 0, err
        assert out["errors"] == 0 and out["calls"] > 4
        np.testing.assert_allclose(out["first"], mlp_reference(X, mlp_weights(0))[0], atol=1e-5)


def test_an_agent_without_shared_memory_is_reported_not_misread(exe: Path, d: Path) -> None:
    with _serve(d, shm=None) as srv:
        rc, _, err = _run(exe, srv.path, "x", "32", "1", "0")
        assert rc == 2 and "no shared memory offered" in err

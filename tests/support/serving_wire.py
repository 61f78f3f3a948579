"""What the serving tests share: a short socket directory, the MLP on disk (and its manifest with
a reference profile, plain or as a 4-class classifier, for telemetry), and the EFB1
frame spoken with nothing but `socket` and `struct` (the layout as docs/inference-api.md
states it, so a test that uses these checks the documentation too)."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.contract.manifest import FeatureProfile, Manifest, PerformanceSpec, ReferenceProfile
from simulators.models import make_mlp_onnx, mlp_manifest

# magic, kind, flags, status, n_arrays, reserved, meta_len, desc_len, payload_len
HEADER = "<4sBBHHHIII"
FLOAT = 1  # ONNX TensorProto FLOAT


@contextmanager
def socket_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp: AF_UNIX paths are limited to ~107 bytes, and pytest's
    tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mlp_file(d: Path, seed: int = 0, version: str = "1.0.0") -> tuple[Path, Manifest]:
    """The MLP 32-64-64-4 of `seed` written to `d`, and its manifest."""
    data = make_mlp_onnx(seed)
    path = d / f"m-{seed}-{version}.onnx"
    path.write_bytes(data)
    return path, mlp_manifest(data, version=version)


def profiled_mlp_manifest(version: str) -> Manifest:
    """The MLP's manifest with a reference profile of 32 numeric features and 4 outputs."""
    num = {"kind": "numeric", "edges": [-2.0, 0.0, 2.0]}
    profile = ReferenceProfile(
        input_name="x",
        features=[FeatureProfile(name=f"f{i}", **num) for i in range(32)],  # type: ignore[arg-type]
        outputs=[FeatureProfile(name=f"logits_{i}", **num) for i in range(4)],  # type: ignore[arg-type]
    )
    return mlp_manifest(make_mlp_onnx(0), version=version).model_copy(update={"reference_profile": profile})


def classifier_mlp_manifest(version: str) -> Manifest:
    """`profiled_mlp_manifest` as a 4-class classifier scored by its logits (labels tracked)."""
    m = profiled_mlp_manifest(version)
    profile = m.reference_profile.model_copy(
        update={"performance": PerformanceSpec(task="classification", classes=4, scores="logits")})
    return m.model_copy(update={"reference_profile": profile})


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes. Raises `EOFError` when the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_reply(s: socket.socket) -> tuple[int, int, int, bytes, bytes, bytes]:
    """kind, flags, status, meta, desc, payload of one EFB1 reply."""
    head = recv_exact(s, struct.calcsize(HEADER))
    magic, kind, flags, status, _n, _res, meta_len, desc_len, payload_len = struct.unpack(HEADER, head)
    assert magic == b"EFB1"
    return (kind, flags, status, recv_exact(s, meta_len), recv_exact(s, desc_len),
            recv_exact(s, payload_len))

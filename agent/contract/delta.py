"""Delta bundles: the wire format, and rebuilding a full bundle from a base and a delta.

Why deltas: a retrained head or a fine-tune that keeps its quantization scales changes a few
percent of a bundle's bytes, yet every device would fetch the whole bundle. A delta is its own
TUF target (signed, hashed, length-bounded like any other); the director document names it
beside the full target. The result is accepted only if it equals the *full* target's signed
length and sha256, so a delta can at worst waste a download: it can never install anything the
full target would not.

File layout: `b"EFD1"`, a big-endian `u32` header length, a JSON header, then one zstd frame.

Two formats (the fleet picks the smaller per bundle, `fleet.registry.deltas`):

- `tensor-diff`: the header lists `ops` covering the new bundle in order, each
  `["L", length]` (literal bytes from the stream) or `["D", length, base_offset]` (stream bytes
  added byte-wise, mod 256, to the base's bytes at `base_offset`). The fleet aligns every weight
  tensor of the new model with the same tensor of the old one, so an unchanged weight is a run
  of zeros and an int8 fine-tune is small differences: both compress far better than LZ matches.
- `zstd-patch`: the whole new bundle compressed with the base bundle as zstd's raw-content
  dictionary (`zstd --patch-from`).

Memory while rebuilding is bounded: `tensor-diff` streams in `CHUNK` pieces; `zstd-patch` maps
the base file (page cache, not heap) plus zstd's window (at most `MAX_WINDOW_BYTES`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from agent.contract.strict import Meta, StrictStruct, ValidationError, describe
from agent.errors import DeltaBaseError, DeltaFormatError, DeltaResultError, MisuseError

MAGIC = b"EFD1"
MAX_HEADER_BYTES = 1 << 20
MAX_OPS = 100_000
MAX_WINDOW_BYTES = 1 << 30
CHUNK = 1 << 20
FORMATS = ("tensor-diff", "zstd-patch")
DeltaFormat = Literal["tensor-diff", "zstd-patch"]
_HEX64 = r"^[0-9a-f]{64}\Z"


class DeltaHeader(StrictStruct, frozen=True, kw_only=True):
    """What a delta claims: its format, the base it applies to and the bundle it rebuilds."""

    schema_version: Literal[1] = 1
    format: DeltaFormat
    base_sha256: Annotated[str, Meta(pattern=_HEX64)]
    base_length: Annotated[int, Meta(ge=1)]
    target_sha256: Annotated[str, Meta(pattern=_HEX64)]
    target_length: Annotated[int, Meta(ge=1)]
    ops: Annotated[list[list[int | str]], Meta(max_length=MAX_OPS)] = []

    def _check(self) -> None:
        if self.format == "zstd-patch":
            if self.ops:
                raise ValueError("a zstd-patch delta has no ops")
            return
        covered = 0
        for op in self.ops:
            kind = op[0] if op else None
            literal = kind == "L" and len(op) == 2 and isinstance(op[1], int) and op[1] >= 1
            diff = (kind == "D" and len(op) == 3 and isinstance(op[1], int) and isinstance(op[2], int)
                    and op[1] >= 1 and op[2] >= 0 and op[2] + op[1] <= self.base_length)
            if literal or diff:
                covered += int(op[1])
            else:
                raise ValueError(f"bad op {op!r}: want ['L', n] or ['D', n, base_offset] inside the base")
        if covered != self.target_length:
            raise ValueError(f"ops cover {covered} bytes, not the target's {self.target_length}")


def encode_delta(header: DeltaHeader, body: bytes) -> bytes:
    """The delta file's bytes: magic, header length, canonical header JSON, zstd body."""
    raw = json.dumps(header.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise MisuseError(f"delta header is {len(raw)} bytes, over {MAX_HEADER_BYTES}")
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def read_header(f: BinaryIO) -> DeltaHeader:
    """Read and validate the header; `f` is left at the start of the zstd body."""
    head = f.read(8)
    if len(head) != 8 or head[:4] != MAGIC:
        raise DeltaFormatError("not a delta file (bad magic)")
    (size,) = struct.unpack(">I", head[4:])
    if size > MAX_HEADER_BYTES:
        raise DeltaFormatError(f"delta header is {size} bytes, over {MAX_HEADER_BYTES}")
    raw = f.read(size)
    if len(raw) != size:
        raise DeltaFormatError("delta header is truncated")
    try:
        return DeltaHeader.model_validate_json(raw)
    except ValidationError as exc:
        raise DeltaFormatError(f"invalid delta header: {describe(exc)}") from None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            sha.update(data)
    return sha.hexdigest()


def apply_delta(base: Path, delta: Path, out: Path, *, expected_sha256: str, expected_length: int) -> Path:
    """Rebuild the full bundle from `base` and `delta` into the new file `out`; return it.

    `expected_sha256`/`expected_length` are the *full* target's TUF-signed hash and length:
    nothing else is accepted. The result is written to a temporary file beside `out` and renamed
    only when it matches. Raises `DeltaFormatError` (malformed, or a delta for another target),
    `DeltaBaseError` (made from another base), `DeltaResultError` (the rebuilt bytes differ from
    the signed target) and `MisuseError` (local I/O).
    """
    out = Path(out)
    try:
        with open(delta, "rb") as f:
            header = read_header(f)
            if header.target_sha256 != expected_sha256 or header.target_length != expected_length:
                raise DeltaFormatError(
                    f"delta rebuilds {header.target_sha256[:12]} ({header.target_length} bytes), not the "
                    f"signed target {expected_sha256[:12]} ({expected_length} bytes)"
                )
            base_size = Path(base).stat().st_size
            if base_size != header.base_length or file_sha256(base) != header.base_sha256:
                raise DeltaBaseError(
                    f"delta is for base {header.base_sha256[:12]}, not the active bundle "
                    f"{file_sha256(base)[:12]}"
                )
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as sink:
                    written, digest = _rebuild(header, base, f, sink, expected_length)
                if written != expected_length or digest != expected_sha256:
                    raise DeltaResultError(
                        f"rebuilt bundle ({written} bytes, sha256 {digest[:12]}) differs from the signed "
                        f"target ({expected_length} bytes, sha256 {expected_sha256[:12]})"
                    )
                tmp.replace(out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise MisuseError(f"cannot rebuild {out.name} from a delta: {exc}") from exc
    return out


class _Sink:
    """Writes and hashes the rebuilt bytes, refusing anything past the signed length."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f, self.limit, self.n, self.sha = f, limit, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self.n + len(data) > self.limit:
            raise DeltaResultError(f"delta rebuilds more than the signed {self.limit} bytes")
        self.f.write(data)
        self.sha.update(data)
        self.n += len(data)


def _rebuild(header: DeltaHeader, base: Path, body: BinaryIO, out: BinaryIO, limit: int) -> tuple[int, str]:
    import zstandard  # lazy: only an agent applying a delta needs the zstd extension loaded

    sink = _Sink(out, limit)
    # zstd's window need not exceed what it can refer to (the fleet's is at most twice the larger
    # of base and output); anything beyond is refused instead of allocated
    span = 2 * (header.base_length + header.target_length)
    window = min(MAX_WINDOW_BYTES, 1 << max(20, span.bit_length()))
    try:
        if header.format == "zstd-patch":
            with _mapped(base) as view:
                dictionary = zstandard.ZstdCompressionDict(
                    memoryview(view), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=window)
                with dctx.stream_reader(body, read_across_frames=False) as reader:
                    while data := reader.read(CHUNK):
                        sink.write(data)
                del reader, dctx, dictionary  # they hold the mapping: release it before it closes
        else:
            dctx = zstandard.ZstdDecompressor(max_window_size=window)
            with dctx.stream_reader(body, read_across_frames=False) as reader, open(base, "rb") as old:
                for op in header.ops:
                    _apply_op(op, reader, old, sink)
                if reader.read(1):
                    raise DeltaFormatError("delta body is longer than its ops")
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"delta body is not a valid zstd stream: {exc}") from None
    return sink.n, sink.sha.hexdigest()


def _apply_op(op: list[int | str], reader: BinaryIO, old: BinaryIO, sink: _Sink) -> None:
    import numpy as np  # lazy: numpy only while adding diffs

    length = int(op[1])
    offset = int(op[2]) if op[0] == "D" else 0
    while length > 0:
        n = min(CHUNK, length)
        data = _read_exact(reader, n)
        if op[0] == "D":
            old.seek(offset)
            prev = old.read(n)
            if len(prev) != n:
                raise DeltaBaseError("delta reads past the end of the base bundle")
            data = (np.frombuffer(data, np.uint8) + np.frombuffer(prev, np.uint8)).tobytes()
            offset += n
        sink.write(data)
        length -= n


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = reader.read(n - got)
        if not data:
            raise DeltaFormatError("delta body ends before its ops")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view


__all__ = [
    "FORMATS",
    "MAGIC",
    "DeltaFormat",
    "DeltaHeader",
    "apply_delta",
    "encode_delta",
    "file_sha256",
    "read_header",
]

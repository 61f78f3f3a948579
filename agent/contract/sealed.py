"""The sealed (encrypted) bundle file: a plain bundle encrypted in fixed-size AEAD chunks.

Layout (see docs/trust.md, "Bundle encryption")::

    MAGIC (8 bytes) | header length (4 bytes, big-endian) | header (canonical JSON) | chunks

The header (`SealedHeader`) is public: the bundle id, the chunk size and the plaintext length.
The plaintext is the whole plain bundle archive (manifest and model), so the manifest's golden
vectors and profile are as confidential as the weights. Chunk `i` is AES-256-GCM under the
bundle's random content key with nonce `i (8 bytes) || final (4 bytes)` and associated data
`sha256(header) || i || final`: a chunk moved to another index, a dropped final chunk, a
chunk of another bundle or an edited header each fail authentication. Every chunk but the last
holds exactly `chunk_bytes` of plaintext, so decryption needs about two chunks of memory.

The content key is used for this one file only (a new bundle gets a new key), which is what
makes the counter nonces safe. Wrapping it for devices is `agent.contract.envelope`.

Errors: `SealedReader` and `read_header` raise `BundleEncryptionError` (malformed, tampered,
truncated, reordered); `seal_stream` raises `MisuseError` (bad arguments).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from typing import TYPE_CHECKING, Annotated, BinaryIO, Literal

from agent.contract.strict import Meta, StrictStruct, ValidationError, describe
from agent.errors import BundleEncryptionError, MisuseError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"EFSEAL\x00\x01"
SCHEME: Literal["edgefleet-seal-v1"] = "edgefleet-seal-v1"
TAG_BYTES = 16
KEY_BYTES = 32
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 16 << 20  # what a hostile header can make a device buffer
MAX_HEADER_BYTES = 4 << 10
_LEN = struct.Struct(">I")


class SealedHeader(StrictStruct, frozen=True, kw_only=True):
    """The public part of a sealed bundle, authenticated by every chunk."""

    scheme: Literal["edgefleet-seal-v1"] = SCHEME
    bundle_id: Annotated[str, Meta(min_length=1, max_length=200)]
    chunk_bytes: Annotated[int, Meta(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)]
    plaintext_bytes: Annotated[int, Meta(ge=0)]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    @property
    def chunks(self) -> int:
        """Chunks in the file: at least one (the final chunk of an empty plaintext is empty)."""
        return max(1, -(-self.plaintext_bytes // self.chunk_bytes))

    @property
    def sealed_bytes(self) -> int:
        """Length of the whole sealed file this header describes."""
        return len(MAGIC) + _LEN.size + len(self.to_json()) + self.plaintext_bytes + self.chunks * TAG_BYTES


def is_sealed(head: bytes) -> bool:
    """Whether a file starting with `head` (at least 8 bytes) is a sealed bundle."""
    return head.startswith(MAGIC)


def _aesgcm(key: bytes) -> AESGCM:
    # lazy: cryptography costs the idle daemon MBs of RSS; only an install of a sealed bundle needs it
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _nonce_and_aad(header_digest: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    counter = struct.pack(">QI", index, 1 if final else 0)
    return counter, header_digest + counter


def read_header(raw: BinaryIO) -> tuple[SealedHeader, bytes]:
    """Read and validate the magic and header; return it and its exact bytes."""
    lead = raw.read(len(MAGIC) + _LEN.size)
    if len(lead) < len(MAGIC) + _LEN.size or not is_sealed(lead):
        raise BundleEncryptionError("not a sealed bundle (bad magic)")
    (size,) = _LEN.unpack(lead[len(MAGIC):])
    if size > MAX_HEADER_BYTES:
        raise BundleEncryptionError(f"sealed bundle header is {size} bytes, over {MAX_HEADER_BYTES}")
    data = raw.read(size)
    if len(data) != size:
        raise BundleEncryptionError("sealed bundle is truncated inside its header")
    try:
        header = SealedHeader.model_validate_json(data)
    except ValidationError as exc:
        raise BundleEncryptionError(f"sealed bundle header is invalid: {describe(exc)}") from None
    if header.to_json() != data:
        raise BundleEncryptionError("sealed bundle header is not in canonical form")
    return header, lead + data


class SealedReader(io.RawIOBase):
    """Forward-only reader of a sealed file's plaintext, one authenticated chunk at a time.

    Every byte of the sealed file passes through `sha256` (the TUF whole-file hash is checked
    by the caller with `hexdigest()` after the last read). Raises `BundleEncryptionError` from
    `read` on the first chunk that fails authentication, on truncation and on trailing data.
    """

    def __init__(self, raw: BinaryIO, key: bytes) -> None:
        super().__init__()
        if len(key) != KEY_BYTES:
            raise BundleEncryptionError("content key has the wrong length")
        self._raw = raw
        self._sha = hashlib.sha256()
        self.header, header_bytes = read_header(raw)
        self._sha.update(header_bytes)
        self._digest = hashlib.sha256(header_bytes).digest()
        self._aead = _aesgcm(key)
        self._index = 0
        self._left = self.header.plaintext_bytes  # plaintext still to decrypt
        self._buffer = memoryview(b"")
        self._done = False
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        target = pos if whence == io.SEEK_SET else self.pos + pos if whence == io.SEEK_CUR else -1
        if target < self.pos:
            raise BundleEncryptionError("sealed bundle is read forward only")
        while self.pos < target and self.read(min(target - self.pos, 1 << 20)):
            pass
        return self.pos

    def hexdigest(self) -> str:
        """sha256 of every sealed byte read so far (the whole file once the plaintext is read)."""
        return self._sha.hexdigest()

    def _next_chunk(self) -> None:
        size = min(self._left, self.header.chunk_bytes)
        final = self._index == self.header.chunks - 1
        sealed = self._raw.read(size + TAG_BYTES)
        if len(sealed) != size + TAG_BYTES:
            raise BundleEncryptionError(f"sealed bundle is truncated in chunk {self._index}")
        self._sha.update(sealed)
        nonce, aad = _nonce_and_aad(self._digest, self._index, final)
        from cryptography.exceptions import InvalidTag  # lazy: see _aesgcm

        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise BundleEncryptionError(
                f"sealed bundle chunk {self._index} fails authentication "
                "(tampered, reordered, of another bundle, or the wrong key)"
            ) from None
        self._index += 1
        self._left -= size
        self._buffer = memoryview(plain)
        if final:
            self._done = True
            if self._raw.read(1):
                raise BundleEncryptionError("sealed bundle has data after its final chunk")

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise BundleEncryptionError("internal: unbounded read of a sealed bundle")
        parts: list[bytes] = []
        want = size
        while want > 0:  # a full read across chunk boundaries: tarfile reads headers whole
            if not self._buffer:
                if self._done:
                    break
                self._next_chunk()
                continue
            part = bytes(self._buffer[:want])
            self._buffer = self._buffer[len(part):]
            parts.append(part)
            want -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read (and authenticate) everything left; the final chunk must have been seen."""
        while self.read(1 << 20):
            pass
        if not self._done:  # pragma: no cover - read() decrypts the final chunk before b""
            raise BundleEncryptionError("sealed bundle ended before its final chunk")


def seal_stream(src: BinaryIO, out: BinaryIO, *, bundle_id: str, plaintext_bytes: int, key: bytes,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> SealedHeader:
    """Encrypt `plaintext_bytes` from `src` into `out` in chunks. Raises `MisuseError`."""
    if len(key) != KEY_BYTES:
        raise MisuseError("content key must be 32 bytes")
    try:
        header = SealedHeader(bundle_id=bundle_id, chunk_bytes=chunk_bytes, plaintext_bytes=plaintext_bytes)
    except ValidationError as exc:
        raise MisuseError(f"cannot seal: {describe(exc)}") from None
    header_bytes = header.to_json()
    out.write(MAGIC + _LEN.pack(len(header_bytes)) + header_bytes)
    digest = hashlib.sha256(MAGIC + _LEN.pack(len(header_bytes)) + header_bytes).digest()
    aead = _aesgcm(key)
    left = plaintext_bytes
    for index in range(header.chunks):
        size = min(left, chunk_bytes)
        plain = src.read(size)
        if len(plain) != size:
            raise MisuseError(f"plaintext is shorter than the {plaintext_bytes} bytes declared")
        nonce, aad = _nonce_and_aad(digest, index, index == header.chunks - 1)
        out.write(aead.encrypt(nonce, plain, aad))
        left -= size
    if src.read(1):
        raise MisuseError(f"plaintext is longer than the {plaintext_bytes} bytes declared")
    return header


def new_content_key() -> bytes:
    """A fresh random AES-256 content key (one per sealed bundle)."""
    return os.urandom(KEY_BYTES)

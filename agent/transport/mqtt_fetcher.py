"""`MqttFetcher`: python-tuf's `FetcherInterface` over MQTT request/response, chunked and resumable.

TUF asks for `mqtt://repo/metadata/2.root.json` or `mqtt://repo/targets/<dir>/<hash>.<name>`;
this fetcher asks the fleet publisher for the object one chunk at a time, keeping at most
`window` requests in flight (so the broker never holds more than window x chunk for this
device), writes every chunk to a spool file as it arrives (memory stays bounded whatever the
size), records finished chunks in a small resume file (so a fetch after a disconnect or a
crash continues where it stopped), and finally streams the spool file to TUF, which checks
length and hashes. Nothing here is trusted: TUF verifies; the fetcher only bounds sizes.

A publisher answer of 404 becomes `DownloadHTTPError(..., 404)`: that is what ends TUF's
root rotation (`N+1.root.json` does not exist yet).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    SlowRetrievalError,
)
from tuf.ngclient.fetcher import FetcherInterface

from agent.contract.protocol import (
    ChunkHeader,
    ObjectRequest,
    Topics,
    decode_chunk,
    encode_request,
    validate_object_path,
)
from agent.errors import MessageError, TransportError
from agent.logs import log_event
from agent.transport import Message, Transport
from agent.transport.fetcher_config import FetcherConfig

logger = logging.getLogger(__name__)
_READ_BLOCK = 64 * 1024


@dataclass
class _Resume:
    """What survives a crash: the object's identity and which chunks are on disk."""

    path: str
    etag: str
    total_length: int
    chunk_size: int
    done: set[int]

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "etag": self.etag,
                "total_length": self.total_length,
                "chunk_size": self.chunk_size,
                "done": sorted(self.done),
            }
        )


@dataclass
class _InFlight:
    index: int
    attempts: int
    deadline: float
    future: Future[Message]


class _Restart(Exception):
    """The object changed under a resumed download (new etag): start over."""


class MqttFetcher(FetcherInterface):
    """Fetch TUF metadata and targets over MQTT; one fetch at a time per instance.

    `chunk_requests` counts chunk requests sent (for tests and metrics);
    `bytes_received` counts payload bytes received, duplicates included.
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        spool_dir: Path,
        config: FetcherConfig | None = None,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.config = config or FetcherConfig()
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._length_hint: int | None = None
        self.chunk_requests = 0
        self.bytes_received = 0

    # --- FetcherInterface ---------------------------------------------------------------
    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[Any]]:
        """As TUF's, but tells `_fetch` the caller's maximum so an oversize object is refused up front."""
        self._length_hint = max_length
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._length_hint = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Download `url` to the spool, then stream it.

        Raises DownloadHTTPError (publisher said 4xx/5xx, 404 for a missing object),
        DownloadLengthMismatchError (over a size limit), SlowRetrievalError (chunks timed out
        after retries) or DownloadError (bad URL, malformed answers, disconnected too long).
        """
        path = object_path_from_url(url)
        part = self.fetch_to_spool(path)
        return self._stream_and_discard(part)

    # --- the download -------------------------------------------------------------------
    def _paths(self, path: str) -> tuple[Path, Path]:
        key = hashlib.sha256(path.encode()).hexdigest()[:40]
        return self.spool_dir / f"{key}.part", self.spool_dir / f"{key}.resume.json"

    def fetch_to_spool(self, path: str) -> Path:
        """Fetch repository object `path` into its spool file and return the file's path.

        The caller owns the returned file (delete it when done). Raises as `_fetch`.
        """
        validate_object_path(path)
        for _ in range(3):
            try:
                return self._download(path)
            except _Restart:
                log_event(logger, "fetch.restart", path=path, why="object changed under resume")
        raise DownloadError(f"{path} kept changing while it was downloaded")

    def _load_resume(self, path: str, state_file: Path, part: Path) -> _Resume | None:
        try:
            raw = json.loads(state_file.read_text())
            state = _Resume(
                path=str(raw["path"]),
                etag=str(raw["etag"]),
                total_length=int(raw["total_length"]),
                chunk_size=int(raw["chunk_size"]),
                done={int(i) for i in raw["done"]},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n = math.ceil(state.total_length / state.chunk_size) if state.total_length else 1
        if (
            state.path != path
            or state.chunk_size != self.config.chunk_size
            or not part.exists()
            or any(not 0 <= i < n for i in state.done)
        ):
            return None
        return state

    def _save_resume(self, state: _Resume, state_file: Path) -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(state_file)

    def _download(self, path: str) -> Path:
        """Hold a per-object lock so two processes never write one spool file."""
        part, _ = self._paths(path)
        lock = part.with_suffix(".lock")
        lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise DownloadError(f"{path} is being fetched by another process into {self.spool_dir}") from None
        try:
            return self._download_locked(path)
        finally:
            lock.unlink(missing_ok=True)  # still held: a concurrent opener fails its LOCK_NB
            os.close(lock_fd)

    def _download_locked(self, path: str) -> Path:
        part, state_file = self._paths(path)
        state = self._load_resume(path, state_file, part)
        if state is None:
            with contextlib.suppress(FileNotFoundError):
                state_file.unlink()
            part.unlink(missing_ok=True)
        else:
            log_event(logger, "fetch.resume", path=path, done=len(state.done))
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if state is None:
                # The first chunk tells us the total length and etag of the object.
                header, _ = self._fetch_chunks(path, [0], None, fd, state_file, first=True)
                state = _Resume(path, header.etag, header.total_length, self.config.chunk_size, {0})
                self._save_resume(state, state_file)
            n = math.ceil(state.total_length / state.chunk_size) if state.total_length else 1
            missing = [i for i in range(n) if i not in state.done]
            if missing:
                self._fetch_chunks(path, missing, state, fd, state_file, first=False)
            os.ftruncate(fd, state.total_length)
            os.fsync(fd)
        except (_Restart, DownloadHTTPError, DownloadLengthMismatchError):
            # Final answers (missing, refused, too big, changed): nothing worth resuming.
            os.close(fd)
            state_file.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Disk full: a spool kept for a resume would keep the disk full, and the agent
            # could then not even record the failure. Free it; the retry starts over.
            state_file.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
            raise DownloadError(f"disk full while fetching {path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)  # transient (timeouts, link lost): keep the spool for a resume
            raise
        os.close(fd)
        state_file.unlink(missing_ok=True)
        return part

    def _check_total(self, path: str, total: int) -> None:
        limit = self.config.max_object_bytes
        if self._length_hint is not None:
            limit = min(limit, self._length_hint)
        if total > limit:
            raise DownloadLengthMismatchError(f"{path} is {total} bytes, over the {limit} byte limit")

    def _send(self, path: str, index: int) -> tuple[bytes, Future[Message]]:
        req_id = secrets.token_hex(8)
        req = ObjectRequest(
            request_id=req_id, path=path, offset=index * self.config.chunk_size, length=self.config.chunk_size
        )
        corr, fut = self.transport.request_async(
            self.topics.requests(),
            encode_request(req),
            response_topic=self.topics.responses(),
            message_expiry_s=max(1, math.ceil(self.config.chunk_timeout_s)),
            correlation_data=bytes.fromhex(req_id),
        )
        self.chunk_requests += 1
        return corr, fut

    def _wait_for_link(self) -> None:
        if not self.transport.wait_connected(self.config.reconnect_wait_s):
            raise DownloadError(f"broker unreachable for {self.config.reconnect_wait_s:.0f}s")

    def _fetch_chunks(
        self,
        path: str,
        indices: list[int],
        state: _Resume | None,
        fd: int,
        state_file: Path,
        *,
        first: bool,
    ) -> tuple[ChunkHeader, bytes]:
        """Fetch `indices` with a bounded window; return the last (header, payload) seen."""
        cfg = self.config
        todo: deque[tuple[int, int]] = deque((i, 0) for i in indices)
        inflight: dict[bytes, _InFlight] = {}
        last: tuple[ChunkHeader, bytes] | None = None
        since_sync = 0
        try:
            while todo or inflight:
                while todo and len(inflight) < cfg.window:
                    index, attempts = todo[0]
                    self._wait_for_link()
                    try:
                        corr, fut = self._send(path, index)
                    except TransportError:
                        time.sleep(0.05)  # lost the link between the check and the publish
                        continue
                    todo.popleft()
                    inflight[corr] = _InFlight(index, attempts, time.monotonic() + cfg.chunk_timeout_s, fut)
                timeout = max(0.0, min(f.deadline for f in inflight.values()) - time.monotonic())
                wait([f.future for f in inflight.values()], timeout=timeout, return_when=FIRST_COMPLETED)
                now = time.monotonic()
                for corr, fl in list(inflight.items()):
                    if fl.future.done() and not fl.future.cancelled():
                        del inflight[corr]
                        header, payload = self._accept(path, fl.index, fl.future.result(), state, first)
                        if header.status in (429, 503):
                            time.sleep(cfg.busy_backoff_s)
                            todo.append((fl.index, fl.attempts))
                            continue
                        os.pwrite(fd, payload, header.offset)
                        self.bytes_received += len(payload)
                        last = (header, payload)
                        if state is not None and fl.index not in state.done:
                            state.done.add(fl.index)
                            since_sync += 1
                            if since_sync >= cfg.fsync_every_chunks:
                                os.fsync(fd)
                                since_sync = 0
                            self._save_resume(state, state_file)
                    elif now >= fl.deadline:
                        del inflight[corr]
                        self.transport.cancel_request(corr)
                        if not self.transport.connected:
                            todo.appendleft((fl.index, fl.attempts))  # not the publisher's fault
                            continue
                        if fl.attempts >= cfg.chunk_retries:
                            raise SlowRetrievalError(
                                f"chunk {fl.index} of {path} unanswered after {fl.attempts + 1} tries"
                            )
                        log_event(logger, "fetch.chunk_retry", level=logging.DEBUG, path=path, index=fl.index)
                        todo.append((fl.index, fl.attempts + 1))
        finally:
            for corr in inflight:
                self.transport.cancel_request(corr)
        if last is None:
            raise DownloadError(f"no chunk of {path} arrived")
        return last

    def _accept(
        self, path: str, index: int, msg: Message, state: _Resume | None, first: bool
    ) -> tuple[ChunkHeader, bytes]:
        """Validate one answer against what was asked; raise the matching TUF download error."""
        try:
            header, payload = decode_chunk(msg.payload, max_payload=self.config.chunk_size)
        except MessageError as exc:
            raise DownloadError(f"malformed chunk for {path}: {exc}") from exc
        offset = index * self.config.chunk_size
        if header.status == 400:
            raise DownloadHTTPError(f"{path}: publisher refused the request: {header.reason}", 400)
        if header.path != path or header.offset != offset:
            raise DownloadError(f"answer for {header.path}@{header.offset}, asked {path}@{offset}")
        if header.status == 404:
            raise DownloadHTTPError(f"{path} not found", 404)
        if header.status in (429, 503):
            return header, payload
        if header.status != 200:
            raise DownloadHTTPError(
                f"{path}: publisher answered {header.status} {header.reason}", header.status
            )
        self._check_total(path, header.total_length)
        if state is not None and (header.etag != state.etag or header.total_length != state.total_length):
            raise _Restart()
        expected = min(self.config.chunk_size, header.total_length - offset)
        if len(payload) != expected:
            raise DownloadError(f"chunk {index} of {path} has {len(payload)} bytes, expected {expected}")
        return header, payload

    def _stream_and_discard(self, part: Path) -> Iterator[bytes]:
        try:
            with part.open("rb") as f:
                while block := f.read(_READ_BLOCK):
                    yield block
        finally:
            part.unlink(missing_ok=True)


def object_path_from_url(url: str) -> str:
    """`mqtt://repo/metadata/1.root.json` -> `metadata/1.root.json`; raise DownloadError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or parts.netloc != "repo" or parts.query or parts.fragment:
        raise DownloadError(f"not an mqtt://repo/ URL: {url!r}")
    path = unquote(parts.path.lstrip("/"))
    try:
        return validate_object_path(path)
    except MessageError as exc:
        raise DownloadError(str(exc)) from exc

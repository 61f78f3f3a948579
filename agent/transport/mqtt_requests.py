"""`PendingRequests`: the MQTT v5 request/response requests that wait for their answer.

Kept apart from `agent.transport.mqtt_client` because it is plain bookkeeping with its own rules,
shared by the threaded client and the simulators' event-loop subclass: an answer resolves the
request with the same correlation data once (a late or duplicate answer finds nothing and is
dropped); the table is bounded (`limit`), so a broker that never answers cannot grow it without
end; and closing the transport cancels whatever still waits. Thread-safe.
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import Future

from agent.errors import TransportError
from agent.transport import Message


class PendingRequests:
    """Correlation data -> the future of its answer, at most `limit` at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._pending: dict[bytes, Future[Message]] = {}

    def open(self, correlation_data: bytes | None = None) -> tuple[bytes, Future[Message]]:
        """A new request (random 8-byte correlation data unless given). Raises TransportError
        at the limit."""
        corr = correlation_data or secrets.token_bytes(8)
        fut: Future[Message] = Future()
        with self._lock:
            if len(self._pending) >= self.limit:
                raise TransportError(f"{len(self._pending)} requests pending; limit reached")
            self._pending[corr] = fut
        return corr, fut

    def answer(self, message: Message) -> bool:
        """Resolve the request `message` answers; True when it answered one (consume it)."""
        if message.correlation_data is None:
            return False
        with self._lock:
            fut = self._pending.pop(message.correlation_data, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(message)
        return True

    def cancel(self, correlation_data: bytes) -> None:
        with self._lock:
            fut = self._pending.pop(correlation_data, None)
        if fut is not None:
            fut.cancel()

    def cancel_all(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.cancel()

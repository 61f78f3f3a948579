"""How the agent talks to the fleet: a small `Transport` interface and its MQTT implementation.

Callers (the fetcher, the daemon, the fleet publisher) depend on `Transport` only, so a test
or another broker client can stand in without touching them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Message:
    """One received message with the MQTT v5 properties edgefleet uses."""

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Handler = Callable[[Message], None]


class Delivery(Protocol):
    """What `Transport.publish` returns: has the broker acknowledged the message yet?

    For QoS 1 that is the broker's PUBACK. A message still unacknowledged when the connection
    drops is sent again by the client after it reconnects (same handle); one unacknowledged
    when the process dies is lost unless the caller kept it (the agent's event outbox does).
    """

    def is_published(self) -> bool: ...


class Transport(Protocol):
    """Publish/subscribe with request/response on top; every handler must be idempotent.

    Delivery is at-least-once (QoS 1): a message may arrive twice or out of order.
    """

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float | None = None) -> None:
        """Start connecting (reconnecting with backoff); wait up to `timeout` s for a CONNACK."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or `timeout` s pass; True when connected."""

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop reconnecting."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry_s: int | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
    ) -> Delivery:
        """Queue one message and return its `Delivery`; raise TransportError when not connected,
        MisuseError when oversize. `user_properties`: MQTT v5 user properties (e.g. `efsig`)."""

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route matching messages to `handler`; kept across reconnects."""

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing `topic_filter`."""

    def add_on_connect(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(session_present)` after every successful (re)connect."""

    def request_async(
        self,
        topic: str,
        payload: bytes,
        *,
        response_topic: str,
        message_expiry_s: int | None = None,
        correlation_data: bytes | None = None,
    ) -> tuple[bytes, Future[Message]]:
        """Publish a request with fresh correlation data; the future resolves with the first answer."""

    def cancel_request(self, correlation_data: bytes) -> None:
        """Forget a pending request (a late answer is then dropped)."""

    def request(self, topic: str, payload: bytes, *, response_topic: str, timeout: float) -> Message:
        """Blocking request/response; raise FetchTimeoutError when no answer arrives in time."""


__all__ = ["Delivery", "Handler", "Message", "Transport"]

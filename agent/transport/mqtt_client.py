"""The paho-mqtt 2.x implementation of `Transport`: MQTT v5, persistent session, Last Will, TLS.

Why our own reconnect loop: paho's built-in one doubles a fixed delay without jitter, so a
fleet that lost its broker reconnects in lock-step. Here a supervisor thread reconnects with
tenacity's jittered, capped exponential backoff, then lets paho's network thread
(`loop_start`, with paho's own reconnect off) run the connection until it drops.
Subscriptions are re-sent after every connect (idempotent on the broker), and the session
(clean_start=False + SessionExpiryInterval) keeps QoS 1 messages queued while offline.

paho does not check the broker's maximum packet size: an oversize publish gets the client
disconnected in a loop, so `publish` refuses anything over the configured limit (and over
the broker's Maximum Packet Size when the CONNACK announces one).

This module holds the connection and its threads; what goes on the wire (properties, size
limit, received messages, subscription matching) is decided by the pure functions of
`agent.transport.mqtt_messages`, and requests waiting for an answer are `mqtt_requests`'s.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_random_exponential,
)

from agent.errors import ConfigError, FetchTimeoutError, MisuseError, TransportError
from agent.logs import log_event
from agent.transport import Handler, Message
from agent.transport.mqtt_config import MqttConfig
from agent.transport.mqtt_messages import (
    handlers_for,
    publish_properties,
    size_limit,
    to_message,
    will_properties,
)
from agent.transport.mqtt_requests import PendingRequests

logger = logging.getLogger(__name__)
__all__ = ["MqttTransport"]


class MqttTransport:
    """`Transport` over one paho client; thread-safe; handlers run on paho's network thread."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self._client.max_inflight_messages_set(config.max_inflight)
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if config.tls:
            try:
                self._client.tls_set(
                    ca_certs=str(config.ca_file) if config.ca_file else None,
                    certfile=str(config.cert_file) if config.cert_file else None,
                    keyfile=str(config.key_file) if config.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"TLS setup failed: {exc}") from exc
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[Handler, int]] = {}
        self._pending = PendingRequests(config.max_pending_requests)
        self._on_connect_cbs: list[Callable[[bool], None]] = []
        self._on_link_down_cbs: list[Callable[[str, bool], None]] = []
        self._connected = threading.Event()
        self._lost = threading.Event()
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._broker_max_packet: int | None = None
        self._last_failure: str = ""  # why the last attempt failed (refused, closed, unreachable)
        self.connects = 0  # successful CONNACKs, for tests and metrics
        self.messages_in = 0  # every message delivered by the broker, duplicates included
        self.bytes_in = 0  # their payload bytes

    # --- connection ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_will(self, topic: str, payload: bytes, retain: bool = True,
                 user_properties: tuple[tuple[str, str], ...] = ()) -> None:
        """Set the Last Will (QoS 1) the broker sends if this client vanishes; used from the next CONNECT."""
        self._check_size(payload)
        props = will_properties(user_properties)
        self._client.will_set(topic, payload, qos=1, retain=retain, properties=props)

    def connect(self, timeout: float | None = None) -> None:
        """Start the supervisor (idempotent) and wait up to `timeout` s for a CONNACK.

        Raises TransportError if not connected in time (the supervisor keeps trying).
        """
        if self._closing.is_set():
            raise MisuseError("transport was closed")
        if self._supervisor is None:
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"mqtt-{self.config.client_id}", daemon=True
            )
            self._supervisor.start()
        wait = self.config.connect_timeout_s if timeout is None else timeout
        if not self._connected.wait(wait):
            why = f" (last refusal: {self._last_failure})" if self._last_failure else ""
            raise TransportError(
                f"not connected to {self.config.host}:{self.config.port} within {wait:.1f}s{why}"
            )

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or `timeout` s pass; True when connected."""
        return self._connected.wait(timeout)

    def close(self) -> None:
        """Disconnect cleanly (the broker discards the Last Will) and stop reconnecting."""
        self._closing.set()
        self._lost.set()
        with contextlib.suppress(OSError, ValueError):
            self._client.disconnect()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        self._client.loop_stop()
        self._connected.clear()
        self._pending.cancel_all()

    def _connect_once(self, first: bool) -> None:
        if first:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            self._client.connect(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                clean_start=self.config.clean_start,
                properties=props,
            )
        else:
            self._client.reconnect()

    def _interruptible_sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)

    def _supervise(self) -> None:
        first = True
        while not self._closing.is_set():
            retrying = Retrying(
                wait=wait_random_exponential(
                    multiplier=self.config.reconnect_min_s, max=self.config.reconnect_max_s
                ),
                stop=stop_when_event_set(self._closing),
                retry=retry_if_exception_type(OSError),
                sleep=self._interruptible_sleep,
                before_sleep=self._attempt_failed,
                reraise=True,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        self._connect_once(first)
            except OSError as exc:  # only when closing
                log_event(logger, "mqtt.connect_abandoned", level=logging.DEBUG, error=str(exc))
                return
            if self._closing.is_set():
                return
            first = False
            self._lost.clear()
            started = time.monotonic()
            self._client.loop_start()
            while not self._closing.is_set():
                if self._lost.wait(0.25):
                    break
                if (
                    not self._connected.is_set()
                    and time.monotonic() - started > self.config.connect_timeout_s
                ):
                    self._link_down(f"no CONNACK within {self.config.connect_timeout_s:g}s", False)
                    break  # no CONNACK in time
            self._connected.clear()
            self._client.loop_stop()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self._last_failure = str(rc)
            log_event(
                logger, "mqtt.refused", level=logging.WARNING, reason=str(rc), client=self.config.client_id
            )
            self._lost.set()
            self._link_down(f"refused by the broker: {rc}", False)
            return
        self._last_failure = ""
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None) if props else None
        with self._lock:
            subs = list(self._subs.items())
            callbacks = list(self._on_connect_cbs)
        for flt, (_handler, qos) in subs:
            client.subscribe(flt, qos=qos)
        self.connects += 1
        self._connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        log_event(
            logger,
            "mqtt.connected",
            level=logging.DEBUG,
            client=self.config.client_id,
            session_present=session_present,
        )
        for cb in callbacks:
            try:
                cb(session_present)
            except Exception:  # a faulty callback must not kill the network thread
                logger.exception("on-connect callback failed")

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._lost.set()
        if was and not self._closing.is_set():
            log_event(
                logger, "mqtt.disconnected", level=logging.INFO, client=self.config.client_id, reason=str(rc)
            )
            self._link_down(str(rc), True)
        elif not was and not self._closing.is_set():
            # Closed before any CONNACK: with TLS 1.3 that is how a broker refuses a client
            # certificate (after the client's side of the handshake), so say so rather than wait
            # for the CONNACK timeout and report "no CONNACK".
            why = f"the broker closed the connection before CONNACK ({rc})"
            if self.config.cert_file is not None:
                why += ": is the client certificate revoked, expired or from another CA?"
            self._last_failure = why
            self._link_down(why, False)

    def add_on_connect(self, callback: Callable[[bool], None]) -> None:
        with self._lock:
            self._on_connect_cbs.append(callback)

    def add_on_link_down(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(reason, was_connected)` when the connection is lost (`was_connected`)
        or an attempt to connect fails (refused, unreachable, no CONNACK in time); never on `close()`."""
        with self._lock:
            self._on_link_down_cbs.append(callback)

    def _attempt_failed(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        why = f"cannot connect: {error}" if error else "cannot connect"
        self._last_failure = why  # what `connect` says when it gives up waiting
        self._link_down(why, False)

    def _link_down(self, reason: str, was_connected: bool) -> None:
        if self._closing.is_set():
            return
        with self._lock:
            callbacks = list(self._on_link_down_cbs)
        for cb in callbacks:
            try:
                cb(reason, was_connected)
            except Exception:  # a faulty callback must not kill the network or supervisor thread
                logger.exception("link-down callback failed")

    # --- publish / subscribe ------------------------------------------------------------
    def _check_size(self, payload: bytes) -> None:
        limit = size_limit(self.config.max_message_bytes, self._broker_max_packet)
        if len(payload) > limit:
            raise MisuseError(f"message of {len(payload)} bytes is over the {limit} byte limit")

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
    ) -> paho.MQTTMessageInfo:
        """Queue one message. Raises MisuseError (oversize) or TransportError (not connected).

        Returns paho's handle (`agent.transport.Delivery`): `is_published()` turns True when the
        broker's PUBACK arrives (QoS 1), also when paho had to send it again after a reconnect.
        """
        self._check_size(payload)
        if not self._connected.is_set():
            raise TransportError(f"not connected; cannot publish to {topic}")
        props = publish_properties(response_topic, correlation_data, message_expiry_s, user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic_filter] = (handler, qos)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages_in += 1
        self.bytes_in += len(msg.payload)
        message = to_message(msg)
        if self._pending.answer(message):
            return
        with self._lock:
            handlers = handlers_for(((flt, h) for flt, (h, _q) in self._subs.items()), msg.topic)
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # one bad message must not stop the network thread
                logger.exception("handler for %s failed", msg.topic)

    # --- request / response -------------------------------------------------------------
    def request_async(
        self,
        topic: str,
        payload: bytes,
        *,
        response_topic: str,
        message_expiry_s: int | None = None,
        correlation_data: bytes | None = None,
    ) -> tuple[bytes, Future[Message]]:
        """Publish a request; the future gets the first answer carrying the same correlation data.

        Raises TransportError (not connected, too many pending) or MisuseError (oversize).
        Late or duplicate answers after the future resolved or was cancelled are dropped.
        """
        corr, fut = self._pending.open(correlation_data)
        with self._lock:
            need_sub = response_topic not in self._subs
            if need_sub:
                self._subs[response_topic] = (lambda _m: None, 1)
        if need_sub and self._connected.is_set():
            self._client.subscribe(response_topic, qos=1)
        try:
            self.publish(
                topic,
                payload,
                response_topic=response_topic,
                correlation_data=corr,
                message_expiry_s=message_expiry_s,
            )
        except Exception:
            self.cancel_request(corr)
            raise
        return corr, fut

    def cancel_request(self, correlation_data: bytes) -> None:
        self._pending.cancel(correlation_data)

    def request(self, topic: str, payload: bytes, *, response_topic: str, timeout: float) -> Message:
        """Blocking request/response. Raises FetchTimeoutError, TransportError or MisuseError."""
        corr, fut = self.request_async(
            topic, payload, response_topic=response_topic, message_expiry_s=max(1, int(timeout))
        )
        try:
            return fut.result(timeout)
        except FutureTimeout:
            self.cancel_request(corr)
            raise FetchTimeoutError(f"no answer on {response_topic} within {timeout:.1f}s") from None

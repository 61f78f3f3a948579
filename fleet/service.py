"""`FleetService`: opens the store, starts the service's components, serves the API, stops cleanly.

Components (the MQTT publisher, the telemetry ingest, the drift monitor, the rollout
controller, ...) implement the two-method `Component` protocol and are started in order before
the API listens and stopped in reverse order after it stops, even when one of them fails.
A `component_factory` (`fleet.components.build_components`) builds them over the service's
store together with the collaborators the API shares (`ServiceParts.api`), which are handed
to `create_app` once: the routes never search the running components for a collaborator.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

import uvicorn
from fastapi import FastAPI

from agent.logs import log_event
from fleet.api import create_app
from fleet.api.deps import ApiCollaborators
from fleet.dashboard.mount import install_dashboard
from fleet.db.files import secure_dir
from fleet.devices.broker_reload import apply_broker_credentials
from fleet.errors import FleetResourceError
from fleet.settings import FleetSettings
from fleet.store import Clock, Store

logger = logging.getLogger("edgefleet.fleet.service")


class Component(Protocol):
    """Something the service runs beside the API (publisher, rollout controller)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ServiceParts(Protocol):
    """What a component factory builds over the service's store (`fleet.components.FleetParts`)."""

    @property
    def components(self) -> Sequence[Component]:
        """The components, in start order."""
        ...

    @property
    def api(self) -> ApiCollaborators:
        """The collaborators the API routes use (built once, shared with the components)."""
        ...


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before keys, databases or components are touched, so a
    busy port fails at once with a sentence instead of after a start-up (and a traceback).

    Raises `FleetResourceError` when the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise FleetResourceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


class FleetService:
    """The fleet process: store + components + HTTP API.

    `run()` blocks until the server exits (SIGINT/SIGTERM); `start_background()` /
    `stop()` run it in a thread for tests and benchmarks. `components` run as given;
    `component_factory(store)` builds more over the service's store, and the API gets the
    collaborators it returns (`parts`).
    """

    def __init__(self, settings: FleetSettings, components: list[Component] | None = None,
                 clock: Clock | None = None,
                 component_factory: Callable[[Store], ServiceParts] | None = None,
                 listener: socket.socket | None = None) -> None:
        self.settings = settings
        self.listener = listener  # bound by `bind_listener` before anything else (see `serve`)
        if settings.device_broker_url is None:  # derived from broker_url: the fleet's listener, likely
            log_event(logger, "fleet.device_broker_url.derived", logging.WARNING, url=settings.device_broker,
                      hint="set --device-broker / EDGEFLEET_DEVICE_BROKER_URL to the devices' listener")
        secure_dir(settings.data_dir)  # 0700 whatever the umask; a looser one is tightened
        kwargs = {"clock": clock} if clock is not None else {}
        self.store = Store(settings.database, busy_timeout_ms=settings.limits.sqlite_busy_timeout_ms,
                           **kwargs)
        log_event(logger, "fleet.database", database=settings.database_shown, dialect=self.store.dialect)
        self.components: list[Component] = list(components or [])
        self.parts: ServiceParts | None = None
        if component_factory is not None:  # components that need the service's store
            self.parts = component_factory(self.store)
            self.components += self.parts.components
        api = self.parts.api if self.parts is not None else None
        self.app: FastAPI = create_app(settings, self.store, collaborators=api)
        install_dashboard(self.app)  # the operator's web dashboard at /ui/ (docs/dashboard.md)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._started: list[Component] = []

    def _start_components(self) -> None:
        # The broker's password file follows the store, also after a crash between the two.
        apply_broker_credentials(self.store, self.settings)  # reload failures are logged
        for comp in self.components:
            comp.start()
            self._started.append(comp)
            log_event(logger, "fleet.component.started", component=comp.name)

    def _stop_components(self) -> None:
        while self._started:
            comp = self._started.pop()
            try:
                comp.stop()
                log_event(logger, "fleet.component.stopped", component=comp.name)
            except Exception as exc:  # keep stopping the others; the failure is logged
                log_event(logger, "fleet.component.stop_failed", logging.ERROR, component=comp.name,
                          error=str(exc))

    def _make_server(self) -> uvicorn.Server:
        config = uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port,
                                log_level="warning", access_log=False, lifespan="on")
        return uvicorn.Server(config)

    def run(self) -> None:
        """Start components, serve until interrupted, then stop everything."""
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the handler that
        # was installed before it: make that handler a clean exit so `finally` below runs.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._start_components()
            self._server = self._make_server()
            log_event(logger, "fleet.api.listening", host=self.settings.host, port=self.settings.port,
                      data_dir=str(self.settings.data_dir))
            self._server.run(sockets=[self.listener] if self.listener is not None else None)
        finally:
            self._stop_components()
            self.store.close()
            log_event(logger, "fleet.stopped")

    def start_background(self, ready_timeout: float = 10.0) -> None:
        """Serve in a daemon thread; returns once the socket listens. Raises `FleetResourceError`
        when the port is taken (bound before the components start: their outgoing connections
        take ephemeral ports, and one of them could otherwise land on the API's port, as
        happened in a test), RuntimeError when the server does not come up."""
        if self.listener is None or self.listener.fileno() < 0:  # none yet, or closed by a stop
            self.listener = bind_listener(self.settings.host, self.settings.port)
        self._start_components()
        self._server = self._make_server()
        server, sockets = self._server, [self.listener]
        self._thread = threading.Thread(target=lambda: server.run(sockets=sockets), name="fleet-api",
                                        daemon=True)
        self._thread.start()
        done = threading.Event()
        for _ in range(int(ready_timeout / 0.02)):
            if self._server.started or not self._thread.is_alive():
                break
            done.wait(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"fleet API did not start on {self.settings.host}:{self.settings.port}")

    def stop(self) -> None:
        """Stop the server thread and the components (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._stop_components()
        self.store.close()

"""The agent's local inference API, built from its config: the Unix socket (optionally with
micro-batching and the shared-memory channel) and/or HTTP on loopback.

Every server module is imported when its server is asked for, not before: an agent with
the HTTP API off never loads `http.server`, and an agent with no API loads neither.
Kept apart from `agent.daemon.core` so the daemon module stays about wiring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import LocalApiConfig

if TYPE_CHECKING:
    from agent.daemon.served_model import ServedModel
    from agent.daemon.serving import TelemetryTap
    from agent.serving.http_server import HttpInferenceServer
    from agent.serving.unix_server import UnixInferenceServer


@dataclass
class LocalApi:
    """The servers that are up (None: off in the config)."""

    unix: UnixInferenceServer | None = None
    http: HttpInferenceServer | None = None

    @property
    def http_port(self) -> int | None:
        """The HTTP server's bound port (its config may ask for port 0)."""
        return None if self.http is None else self.http.port

    def stop(self) -> None:
        """Stop both; never raises (it runs on shutdown, whatever failed before)."""
        for server in (self.unix, self.http):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


def start_local_api(api: LocalApiConfig, served: ServedModel, tap: TelemetryTap) -> LocalApi:
    """Start the servers `api` enables."""
    from agent.serving.api import ApiLimits  # lazy: the API's modules load when it starts

    out = LocalApi()
    limits = ApiLimits(max_body_bytes=api.max_body_bytes, max_batch=api.max_batch)
    if api.unix_enabled:
        from agent.serving.batch_run import BatchConfig  # lazy: with the Unix server
        from agent.serving.shm_server import ShmConfig  # lazy: with the Unix server
        from agent.serving.unix_server import UnixInferenceServer  # lazy: only when enabled

        api.unix_socket.parent.mkdir(parents=True, exist_ok=True)
        batching = (None if api.unix_batch_window_us is None
                    else BatchConfig(api.unix_batch_window_us, api.unix_batch_max_rows))
        shm = ShmConfig(api.unix_shm_spin_us) if api.unix_shm else None
        out.unix = UnixInferenceServer(served, api.unix_socket, limits, tap, batching, shm).start()
    if api.http_enabled:
        from agent.serving.http_server import HttpInferenceServer  # lazy: http.server only when enabled

        try:
            out.http = HttpInferenceServer(served, api.http_host, api.http_port, limits, tap,
                                           metrics=tap.metrics_text).start()
        except BaseException:
            out.stop()  # the Unix socket must not outlive a start that failed (port taken)
            raise
    return out

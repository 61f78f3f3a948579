"""`edgefleet demo --serve`: after the scenarios, a live fleet and swarm to look at in the dashboard.

The scenarios tear their worlds down when they finish, so the demo then starts one more that
stays: a broker (the one given, or a private Mosquitto / the embedded broker as for the
scenarios), the real fleet service on port 8080 when it is free, and the same swarm, through
`simulators.live_fleet`. It prints the dashboard's URL and a login key made for this run only
(an operator key, shown once; the data directory is temporary, so the key dies with it), then
plays a short story in the background so there is something to watch: v1 everywhere, a canary
of an int8 v2 through 25/50/100 %, then drift on cohort `eu` (alerts and a retraining trigger).
It runs until Ctrl-C or SIGTERM, then stops everything.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from fleet.errors import FleetError
from simulators.broker import BrokerSettings, parse_broker_url, start_broker
from simulators.live_fleet import FINAL, LiveFleet

DASHBOARD_PORT = 8080
WINDOW_S = 10.0
CANARY_BAKE_S = 15.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _live_broker(url: str | None, workdir: Path, devices: int,
                 prefer_embedded: bool | None) -> Iterator[tuple[str, int]]:
    if url:
        yield parse_broker_url(url)
        return
    broker = start_broker(workdir / "broker", BrokerSettings(max_connections=max(1024, 2 * devices + 64)),
                          prefer_embedded=prefer_embedded)
    try:
        yield broker.host, broker.port
    finally:
        broker.stop()


def _story(live: LiveFleet, say: Callable[[str], None], stop: threading.Event) -> None:
    """The operator's afternoon, through the API (errors are told, never raised)."""
    try:
        live.register("1.0.0", "2.0.0")
        live.provision("1.0.0", timeout=max(120.0, 0.6 * len(live.ids)))
        say("story: every device runs mlp 1.0.0; starting a canary of the int8 mlp 2.0.0")
        rid = live.canary("2.0.0", [25, 50, 100], bake_s=CANARY_BAKE_S)
        st = live.wait_state(rid, FINAL, timeout=600)
        say(f"story: rollout {rid} {st['state']}; injecting drift into cohort eu")
        if stop.wait(2 * WINDOW_S):
            return
        live.inject_drift()
        if live.wait_alert(10 * WINDOW_S):
            say("story: the drift monitor raised alerts: see Drift and alerts, acknowledge one")
    except FleetError as exc:
        say(f"story stopped: {exc}")


def serve_live(broker_url: str | None, prefer_embedded: bool | None, devices: int,
               say: Callable[[str], None]) -> None:
    """Run the live fleet until interrupted (see the module docstring). Raises FleetError."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-live-") as tmp, \
            _live_broker(broker_url, Path(tmp), devices, prefer_embedded) as (host, port):
        live = LiveFleet(Path(tmp), host, port, devices, prefix="demo", window_s=WINDOW_S, processes=0,
                         port=DASHBOARD_PORT if _port_free(DASHBOARD_PORT) else None)
        stop = threading.Event()
        live.start()
        try:
            key = live.login_key("operator", "demo-operator")
            say(f"Dashboard: {live.url}  (log in with this operator key, shown once: {key})")
            say(f"API: {live.fleet.base_url}/docs · {devices} devices · Ctrl-C stops the fleet and the swarm")
            thread = threading.Thread(target=_story, args=(live, say, stop), name="demo-story", daemon=True)
            thread.start()
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(1.0):
                    pass
        finally:
            stop.set()
            live.stop()

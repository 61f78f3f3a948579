"""The agent says what happens to its broker link: logs on connect and loss, `agent status` shows it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli.agent_commands import group
from agent.daemon.broker_link import BrokerLink, BrokerStatus
from agent.errors import TransportError
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from tests.support.agent_world import Fleet, make_agent, running_fleet, wait_until
from tests.support.broker import free_port


def _status(config: Path) -> str:
    res = CliRunner().invoke(group, ["status", "--config", str(config)])
    assert res.exit_code == 0, res.output
    return next(line for line in res.output.splitlines() if line.startswith("broker "))


@pytest.mark.unit
def test_link_changes_are_logged_once_and_written_for_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    link = BrokerLink(tmp_path, "mq.example:8883", clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent")
    link.connecting()
    for _ in range(3):
        link.down("cannot connect: [Errno 111] Connection refused", False)
    unreachable = [r for r in caplog.records if r.getMessage() == "agent.broker_unreachable"]
    assert [r.levelno for r in unreachable] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    status = BrokerStatus.read(tmp_path)
    assert status is not None and status.state == "connecting" and "refused" in (status.last_error or "")
    assert status.describe(now[0] + 5, running=True).startswith("never connected to mq.example:8883")
    now[0] += 30
    link.connected(session_present=False)
    connected = [r for r in caplog.records if r.getMessage() == "agent.broker_connected"]
    assert connected and connected[-1].levelno == logging.INFO and connected[-1].after_s == 30.0  # type: ignore[attr-defined]
    assert BrokerStatus.read(tmp_path).describe(now[0] + 61, running=True) == (  # type: ignore[union-attr]
        f"connected to mq.example:8883 since {_local(now[0])} (61s)")
    link.down("Unspecified error", True)
    lost = [r for r in caplog.records if r.getMessage() == "agent.broker_lost"]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    link.down("cannot connect: [Errno 111] Connection refused", False)  # retries after a loss: DEBUG
    levels = [r.levelno for r in caplog.records if r.getMessage() == "agent.broker_unreachable"]
    assert levels[-1] == logging.DEBUG
    status = BrokerStatus.read(tmp_path)
    assert status is not None and status.state == "disconnected" and status.connects == 1
    assert "disconnected from mq.example:8883" in status.describe(now[0], running=True)
    assert "agent not running" in status.describe(now[0], running=False)
    link.stopped()
    assert BrokerStatus.read(tmp_path).describe(now[0], running=False).startswith("agent stopped at")  # type: ignore[union-attr]


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@pytest.mark.integration
def test_transport_reports_failed_attempts_and_a_lost_connection(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []
    nobody = MqttTransport(MqttConfig(port=free_port(), client_id="link-nobody", reconnect_min_s=0.05,
                                      reconnect_max_s=0.1))
    nobody.add_on_link_down(lambda reason, was: seen.append((reason, was)))
    with pytest.raises(TransportError):
        nobody.connect(timeout=0.5)
    nobody.close()
    assert seen and all(not was and "cannot connect" in reason for reason, was in seen)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("broker-link")) as fleet:
        yield fleet


def _logged(agent_log: Path, event: str) -> list[dict[str, object]]:
    out = []
    for line in agent_log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == event:
            out.append(doc)
    return out


@pytest.mark.integration
def test_a_running_agent_logs_and_shows_its_broker_link(fleet: Fleet) -> None:
    agent = make_agent(fleet, "gw-link", http=False).start()
    broker = f"127.0.0.1:{fleet.broker.port}"
    try:
        wait_until(lambda: _logged(agent.log, "agent.broker_connected"), 30, "agent.broker_connected")
        assert _logged(agent.log, "agent.broker_connected")[0]["broker"] == broker
        assert _status(agent.config_path).split(None, 1)[1].startswith(f"connected to {broker} since")
        fleet.broker.stop()
        lost = wait_until(lambda: _logged(agent.log, "agent.broker_lost"), 30, "agent.broker_lost")
        assert lost[0]["level"] == "warning" and lost[0]["broker"] == broker
        wait_until(lambda: "disconnected from" in _status(agent.config_path), 10, "status: disconnected")
        assert "reconnecting" in _status(agent.config_path)
        fleet.broker.restart()
        wait_until(lambda: len(_logged(agent.log, "agent.broker_connected")) >= 2, 30, "a reconnect")
        wait_until(lambda: "connected to" in _status(agent.config_path).replace("disconnected", ""), 10,
                   "status: connected again")
    finally:
        assert agent.stop() == 0
        if fleet.broker.proc.poll() is not None:
            fleet.broker.restart()
    assert "agent stopped at" in _status(agent.config_path)
    assert "Traceback" not in agent.log.read_text(errors="replace")

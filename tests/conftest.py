"""Session fixtures: a private Mosquitto broker on a free port, started once per session.

The broker itself is `tests.support.broker`; tests that need their own broker call
`start_mosquitto` from there (no test imports this module).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.broker import Broker, start_mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A private Mosquitto for the whole session (anonymous, MQTT v5 capable)."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield broker
    finally:
        broker.stop()

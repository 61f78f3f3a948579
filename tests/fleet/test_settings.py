"""The fleet's two broker URLs, its broker password sources and its database (`fleet/settings.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.components import broker_config
from fleet.settings import FleetSettings


@pytest.mark.unit
def test_the_device_url_never_carries_credentials() -> None:
    for url in ("mqtts://dev-0042:pw@broker:8883", "mqtt://fleet@broker:1884", "mqtt://:pw@broker"):
        with pytest.raises(ValidationError, match="must not carry credentials"):
            FleetSettings(device_broker_url=url)
    with pytest.raises(ValidationError, match="mqtt://host:port"):
        FleetSettings(device_broker_url="http://broker:8883")
    derived = FleetSettings(broker_url="mqtts://fleet:s%40cret@[::1]:1884")
    assert derived.device_broker == "mqtts://[::1]:1884"
    told = FleetSettings(broker_url="mqtt://fleet:x@127.0.0.1:1884", device_broker_url="mqtts://b:8883")
    assert told.device_broker == "mqtts://b:8883"


@pytest.mark.unit
def test_the_password_comes_from_the_environment_or_a_file(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    env = {"EDGEFLEET_BROKER_URL": "mqtt://fleet@127.0.0.1:1884", "EDGEFLEET_BROKER_PASSWORD": "s3cret",
           "EDGEFLEET_DEVICE_BROKER_URL": "mqtts://broker:8883"}
    settings = FleetSettings.from_env(env)
    assert settings.broker_password is not None and settings.broker_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and settings.device_broker == "mqtts://broker:8883"
    cfg = broker_config(settings.broker_url, "fleet-1", settings.broker_password.get_secret_value())
    assert (cfg.username, cfg.password, cfg.port) == ("fleet", "s3cret", 1884)

    secret = tmp_path / "broker-password"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    file_env = {"EDGEFLEET_BROKER_URL": "mqtt://fleet@h:1884", "EDGEFLEET_BROKER_PASSWORD_FILE": str(secret)}
    caplog.set_level(logging.WARNING, logger="edgefleet.fleet.settings")
    from_file = FleetSettings.from_env(file_env)
    assert from_file.broker_password is not None
    assert from_file.broker_password.get_secret_value() == "from-file"
    assert not caplog.records
    secret.chmod(0o644)
    FleetSettings.from_env(file_env)
    assert [r.getMessage() for r in caplog.records] == ["fleet.broker_password_file.readable"]

    with pytest.raises(ValidationError, match="given twice"):
        FleetSettings.from_env({**env, "EDGEFLEET_BROKER_URL": "mqtt://fleet:other@h:1884"})
    with pytest.raises(ValidationError, match="needs a user"):
        FleetSettings.from_env({"EDGEFLEET_BROKER_PASSWORD": "x"})
    with pytest.raises(ValidationError, match="cannot read broker password file"):
        FleetSettings.from_env({**file_env, "EDGEFLEET_BROKER_PASSWORD_FILE": str(tmp_path / "absent")})
    secret.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        FleetSettings.from_env(file_env)


@pytest.mark.unit
def test_the_database_is_sqlite_files_by_default_or_one_postgres_url() -> None:
    local = FleetSettings.from_env({"EDGEFLEET_DATA_DIR": "/srv/fleet"})
    assert (local.database, local.telemetry_database, local.alerts_database, local.director_database) == (
        Path("/srv/fleet/fleet.db"), Path("/srv/fleet/telemetry.db"), Path("/srv/fleet/alerts.db"), None)
    url = "postgresql://fleet:s3cret@db:5432/fleet"
    shared = FleetSettings.from_env({"EDGEFLEET_DATABASE_URL": url})
    places = {shared.database, shared.telemetry_database, shared.alerts_database, shared.director_database}
    assert places == {url}
    assert shared.database_shown == "postgresql://fleet:***@db:5432/fleet"
    assert "s3cret" not in repr(shared) and "s3cret" not in str(shared.model_dump())
    assert FleetSettings(database_url="postgres://db/fleet").database == "postgresql://db/fleet"
    for bad in ("sqlite:///x.db", "mysql://db/fleet", "/srv/fleet/fleet.db"):
        with pytest.raises(ValidationError, match="postgresql://"):
            FleetSettings(database_url=bad)

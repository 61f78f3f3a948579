"""`--role`: parsing, and what the one composition root builds for each role."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cluster.roles import ALL_ROLES, Role, parse_roles
from fleet.components import ServeConfig, build_components
from fleet.errors import FleetInputError
from fleet.settings import FleetSettings
from fleet.store import Store


@pytest.mark.unit
def test_roles_parse_from_repeats_and_comma_lists() -> None:
    assert parse_roles(["all"]) == ALL_ROLES == parse_roles([])
    assert parse_roles(["api", "ingest,controller"]) == {Role.API, Role.INGEST, Role.CONTROLLER}
    assert parse_roles([" Publisher "]) == {Role.PUBLISHER}
    with pytest.raises(FleetInputError, match="unknown role 'leader'"):
        parse_roles(["api,leader"])


@pytest.mark.integration
@pytest.mark.parametrize(("roles", "names"), [
    ({Role.API}, ["telemetry-ingest"]),
    ({Role.INGEST}, ["telemetry-ingest", "dataset-ingest"]),
    ({Role.CONTROLLER}, ["telemetry-ingest", "dataset-ingest", "leader-elector", "drift-monitor",
                         "rollout-controller", "experiment-driver", "timestamp-refresher", "crl-refresher",
                         "collection-driver"]),
])
def test_each_role_builds_only_its_components(tmp_path: Path, roles: set[Role], names: list[str]) -> None:
    settings = FleetSettings(data_dir=tmp_path)
    store = Store(settings.db_path)
    try:
        parts = build_components(settings, store, with_broker=False, config=ServeConfig(root_keys=1,
                                 root_threshold=1), roles=frozenset(roles))
        assert [c.name for c in parts.components] == names
        assert (parts.controller is None) == (Role.CONTROLLER not in roles)
        assert (parts.elector is None) == (Role.CONTROLLER not in roles)
        for c in parts.components:
            if c.name in ("leader-elector", "dataset-ingest"):
                c.stop()  # closes its own connection
        parts.telemetry.close()
    finally:
        store.close()


@pytest.mark.integration
def test_an_unknown_role_is_a_one_line_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve", "--data-dir", str(tmp_path),
                          "--port", "0", "--role", "api,bogus"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown role 'bogus'" in res.stderr and "Traceback" not in res.stderr

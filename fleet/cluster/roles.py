"""What one fleet process does: `edgefleet fleet serve --role api|publisher|ingest|controller|all`.

- `api`: the HTTP API and dashboard only; it holds no state of its own (everything is in the
  database and the repository), so any number run behind a load balancer.
- `publisher`: answers device requests (chunked bundles, TUF metadata) on the shared
  subscription `$share/<publish group>/.../repo/requests/+`; any number.
- `ingest`: reported state on `$share/<ingest group>/.../devices/+/reported`, telemetry on
  `$share/<ingest group>-telemetry/...` and events on `$share/<ingest group>-events/...` (each a
  connection of its own, acknowledged once stored: `fleet.delivery.acked_stream`);
  any number, deduplicated in the database (events by (device, seq): `fleet.delivery.event_log`;
  telemetry by (device, seq): `fleet.telemetry.ingest`).
- `controller`: the rollout controller, the A/B experiment driver, the drift monitor's
  evaluation and alerts, and the timestamp refresher; run two or more, exactly one is active
  (the holder of the `controller` lease, `fleet.cluster.leader`), the others stand by.
- `all` (the default): every role in one process, as before.

Every process serves the HTTP API (`/healthz`, `/metrics` of its own components); only roles
with `api` are meant to be put behind the load balancer. Why one composition root for all:
a role is a subset of the same collaborators (`fleet.components.build_components`), so a
split deployment runs exactly the code the single process runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import FleetInputError


class Role(StrEnum):
    API = "api"
    PUBLISHER = "publisher"
    INGEST = "ingest"
    CONTROLLER = "controller"


ALL_ROLES: frozenset[Role] = frozenset(Role)


def parse_roles(values: Iterable[str]) -> frozenset[Role]:
    """`["api", "ingest,controller"]` or `["all"]` to roles; raises `FleetInputError` naming a bad one."""
    roles: set[Role] = set()
    for value in values:
        for name in filter(None, (v.strip().lower() for v in value.split(","))):
            if name == "all":
                roles |= ALL_ROLES
                continue
            try:
                roles.add(Role(name))
            except ValueError:
                known = ", ".join([*(r.value for r in Role), "all"])
                raise FleetInputError(f"unknown role {name!r} (known: {known})") from None
    return frozenset(roles) or ALL_ROLES


class ClusterSettings(BaseModel):
    """Shared-subscription groups and the leader lease (env `EDGEFLEET_CLUSTER_<NAME>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    publish_share_group: str = Field(default="edgefleet-publish", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    ingest_share_group: str = Field(default="edgefleet-ingest", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    leader_ttl_s: float = Field(default=5.0, ge=0.3, le=600,
                                description="A standby takes over this long after the leader's last renewal")

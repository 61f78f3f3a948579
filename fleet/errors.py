"""The fleet's errors: the product hierarchy's cause classes, marked as the fleet's own.

Every fleet error derives from `FleetError` *and* from the cause class of `agent.errors` it
stands for, so there is one root for the whole product (`agent.errors.EdgefleetError`):

- `FleetInputError` (`UntrustedDataError`): an operator's or a device's input is invalid (bad
  model, bad report, unknown name, conflicting request, bad credential); nothing was changed.
- `FleetTransportError` (`TransportError`): the broker, a webhook or another peer failed;
  retried.
- `FleetResourceError` (`LocalResourceError`): the fleet host ran out of something (a full
  disk while writing a bundle).
- `FleetMisuseError` (`MisuseError`): wrong call or configuration (missing key, repository not
  initialised).
- `GateFailed` (`RuntimeFailure`, like the agent's `HealthCheckFailed`): the model ran and its
  measured behaviour failed a quality gate (carries the figures).

Callers that handle agent and fleet errors alike catch `EdgefleetError` (or one cause class);
`except FleetError` still means "only the fleet's own". See docs/errors.md for the whole tree.
"""

from __future__ import annotations

from agent.errors import (
    EdgefleetError,
    LocalResourceError,
    MisuseError,
    RuntimeFailure,
    TransportError,
    UntrustedDataError,
)


class FleetError(EdgefleetError):
    """Root of every error the fleet raises on purpose (a branch of `EdgefleetError`)."""


class FleetInputError(FleetError, UntrustedDataError):
    """Input from an operator or a device is invalid; nothing was changed."""


class FleetTransportError(FleetError, TransportError):
    """The broker, a webhook or another network peer failed."""


class FleetResourceError(FleetError, LocalResourceError):
    """A local resource of the fleet host is exhausted or unwritable (e.g. a full disk)."""


class FleetMisuseError(FleetError, MisuseError):
    """The call or configuration is wrong (e.g. keys missing, repository not initialised)."""


class SigningKeyError(FleetMisuseError):
    """A signing key is missing, unreadable or does not match the role it signs for."""


class GateFailed(FleetError, RuntimeFailure):
    """A validation or rollout gate refused; `figures` holds the measurements."""

    def __init__(self, reason: str, figures: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.figures = dict(figures or {})


class NotFound(FleetInputError):
    """The named resource (model, version, device, rollout, key, token) does not exist."""


class Conflict(FleetInputError):
    """The request conflicts with the stored state (duplicate, refused transition, reused key)."""


class AuthError(FleetInputError):
    """A credential (API key, enrollment token) is missing, unknown, expired, used or revoked."""

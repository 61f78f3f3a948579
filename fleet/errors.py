"""The fleet's one error hierarchy, split by cause (mirrors `agent.errors`).

- `FleetInputError`: an operator's or device's input is invalid (bad model, bad report).
- `FleetTransportError`: the broker or a webhook failed; retried.
- `FleetMisuseError`: wrong call or configuration (missing key, repository not initialised).
- `GateFailed`: a quality or rollout gate refused (carries the figures).
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error the fleet raises on purpose."""


class FleetInputError(FleetError):
    """Input from an operator or a device is invalid; nothing was changed."""


class FleetTransportError(FleetError):
    """The broker, a webhook or another network peer failed."""


class FleetMisuseError(FleetError):
    """The call or configuration is wrong (e.g. keys missing, repository not initialised)."""


class SigningKeyError(FleetMisuseError):
    """A signing key is missing, unreadable or does not match the role it signs for."""


class GateFailed(FleetError):
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

"""One error hierarchy for the product: every fleet error is an `EdgefleetError` of its cause."""

from __future__ import annotations

import pytest

from agent.errors import (
    DirectorError,
    EdgefleetError,
    LocalResourceError,
    MisuseError,
    RuntimeFailure,
    TransportError,
    UntrustedDataError,
)
from fleet import errors as fe


@pytest.mark.unit
def test_every_fleet_error_is_an_edgefleet_error_of_its_cause() -> None:
    causes = {fe.FleetInputError: UntrustedDataError, fe.FleetTransportError: TransportError,
              fe.FleetResourceError: LocalResourceError, fe.FleetMisuseError: MisuseError,
              fe.GateFailed: RuntimeFailure}
    for cls, cause in causes.items():
        assert issubclass(cls, fe.FleetError) and issubclass(cls, cause) and issubclass(cls, EdgefleetError)
    for cls in (fe.NotFound, fe.Conflict, fe.AuthError):
        assert issubclass(cls, fe.FleetInputError)
    assert issubclass(fe.SigningKeyError, fe.FleetMisuseError)
    assert not issubclass(DirectorError, fe.FleetError)  # `except FleetError` stays the fleet's own


@pytest.mark.unit
def test_one_except_clause_catches_both_sides() -> None:
    for exc in (fe.NotFound("model m"), DirectorError("replayed")):
        with pytest.raises(UntrustedDataError):
            raise exc
    gate = fe.GateFailed("too far", {"max_abs_delta": 2.0})
    assert (gate.reason, gate.figures) == ("too far", {"max_abs_delta": 2.0})

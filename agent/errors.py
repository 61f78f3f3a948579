"""The product's one error hierarchy (agent and fleet), split by cause.

`EdgefleetError` is the root of every error edgefleet raises on purpose. It lives here, in the
bottom layer, because the agent never imports the fleet while the fleet imports the agent's
contract: `fleet.errors` derives each fleet error from the cause classes below, so
`except EdgefleetError` catches both sides and `except TransportError` catches the agent's and
the fleet's network failures alike (see docs/errors.md for the whole tree).

- `UntrustedDataError`: something received (a bundle, metadata, a director document, a
  message, an inference request, an operator's input) failed a check. Never retried as-is;
  reported.
- `TransportError`: the network or broker failed. Retried with backoff.
- `LocalResourceError`: this machine ran out of something (disk space, file handles) or a
  local file cannot be written. May succeed once the resource is freed.
- `MisuseError`: the caller or the configuration is wrong. Fix the call or the config.
- `RuntimeFailure`: the model runtime failed while loading or running a verified model, or
  the model's measured behaviour failed a check.

Every public function documents which of these it raises.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""


# --- untrusted data -------------------------------------------------------------------
class UntrustedDataError(EdgefleetError):
    """Received data failed verification or validation; trusted state is unchanged."""


class ManifestError(UntrustedDataError):
    """A bundle manifest is malformed or inconsistent with the bundle."""


class BundleError(UntrustedDataError):
    """A bundle archive is malformed, unsafe to extract, over a limit or tampered."""


class BundleManifestError(BundleError, ManifestError):
    """The manifest inside a bundle is malformed (catchable as either parent)."""


class BundleEncryptionError(BundleError):
    """An encrypted (sealed) bundle or its wrapped keys failed authentication or are malformed.

    Tampered, truncated or reordered ciphertext chunks, a wrapped key made for another bundle,
    a recipients document that names another ciphertext. Nothing is installed.
    """


class BundleNotForThisDeviceError(BundleEncryptionError):
    """An encrypted bundle carries no content key wrapped for this device's key (another cohort)."""


class TrustError(UntrustedDataError):
    """TUF verification of metadata or a target failed (signature, expiry, rollback, hash)."""


class DirectorError(UntrustedDataError):
    """A director document failed its signature, sequence, expiry or addressee check."""


class UnknownDirectorKeyError(DirectorError):
    """A director document carries signatures only by keys the trusted root does not know.

    Its own type because the daemon treats it differently from every other refusal: the
    document may be signed by rotated director keys, so it is held until the TUF metadata
    has been refreshed once (a new root brings the new keys) and then checked again.
    """


class DeltaError(UntrustedDataError):
    """A delta bundle cannot be trusted to rebuild the signed full bundle (the agent falls back)."""


class DeltaFormatError(DeltaError):
    """A delta file is malformed, over a limit, or names another target than the signed one."""


class DeltaBaseError(DeltaError):
    """A delta was made from another base bundle than the one this device runs."""


class DeltaResultError(DeltaError):
    """Applying a delta produced bytes whose length or sha256 differ from the signed full target."""


class ReportAuthError(UntrustedDataError):
    """A device report is not signed by that device's registered key (or is a replay)."""


class UnsignedReportError(ReportAuthError):
    """No (or a malformed) signature header."""


class BadReportSignatureError(ReportAuthError):
    """The signature does not verify with the device's key (another device's key, or modified)."""


class ReplayedReportError(ReportAuthError):
    """The counter is not above the last accepted one: a replayed (or reordered) report."""


class OfflineImportError(UntrustedDataError):
    """An offline update file is malformed, unsafe to extract, or over a size limit."""


class MessageError(UntrustedDataError):
    """A protocol message is malformed, oversized or not for this device."""


class InputValidationError(UntrustedDataError):
    """An inference request does not match the model's input schema."""


# --- transport --------------------------------------------------------------------------
class TransportError(EdgefleetError):
    """The broker or network failed; the operation may succeed when retried."""


class FetchTimeoutError(TransportError):
    """An object requested over MQTT did not arrive in time."""


class NotFoundError(TransportError):
    """The publisher answered that an object does not exist (the 404 of the MQTT fetcher)."""


# --- local resource ---------------------------------------------------------------------
class LocalResourceError(EdgefleetError):
    """A local resource is exhausted or unwritable (full disk, file handles); retry once freed."""


# --- misuse -----------------------------------------------------------------------------
class MisuseError(EdgefleetError):
    """The caller or the configuration is wrong (bad argument, missing file, bad state)."""


class ConfigError(MisuseError):
    """A configuration file or value is invalid."""


# --- runtime ----------------------------------------------------------------------------
class RuntimeFailure(EdgefleetError):
    """The model runtime could not load or run a model (crash, hang, resource limit)."""


class HealthCheckFailed(RuntimeFailure):
    """A model failed golden vectors or probation; carries the reason and measurements."""

    def __init__(self, reason: str, measurements: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.measurements = dict(measurements or {})


# --- local inference API (appended by the runtimes/inference-API helper) -------------
class RequestTooLargeError(MessageError):
    """An inference request is over a configured limit (body bytes, batch rows, header size)."""


class NoModelLoadedError(RuntimeFailure):
    """No model is active yet, so there is nothing to serve (HTTP 503); retry later."""


class InferenceTimeoutError(RuntimeFailure):
    """A load, warm-up, golden check or request did not finish within its deadline (a hang)."""


class FeedbackDisabledError(MisuseError):
    """Labels were sent to an inference API that does not track predictions (HTTP 404)."""

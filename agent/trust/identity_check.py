"""What `agent run` warns about at start: a TLS key others can read, a certificate near expiry.

Kept apart from `agent.trust.client_cert` (key pair, CSR and issued-certificate checks for
`agent enroll`) because that module imports cryptography's x509 at the top, and cryptography's
Rust extension costs ~9 MB RSS (docs/benchmarks.md, `agent_footprint`). `agent run` on a device
without a client certificate (password or anonymous broker auth) must not carry that for a
check it never makes, so cryptography is imported here only when a certificate file is
configured, to read its expiry (the standard library's `ssl` has no public API for that).
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any

EXPIRY_WARNING = dt.timedelta(days=14)  # renewal is manual today: say it early


def _not_after(cert_file: Path) -> dt.datetime | None:
    """The certificate's expiry (UTC), or None when the file is unreadable or not a PEM certificate
    (left to the transport, which refuses it with a ConfigError)."""
    from cryptography import x509  # lazy: only for a device with a client certificate (see above)

    try:
        return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


def identity_warnings(cert_file: Path | None, key_file: Path | None,
                      now: dt.datetime | None = None) -> list[tuple[str, dict[str, Any]]]:
    """`(event, fields)` pairs: a private key others can read, a certificate that has expired or
    expires within `EXPIRY_WARNING` (the broker then refuses it)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if key_file is not None:
        try:
            loose = stat.S_IMODE(key_file.stat().st_mode) & 0o077
        except OSError:
            loose = 0
        if loose:
            hint = f"chmod 600 {key_file}: it is the device's identity"
            out.append(("agent.client_key_readable", {"path": str(key_file), "hint": hint}))
    until = _not_after(cert_file) if cert_file is not None else None
    if cert_file is None or until is None:
        return out
    moment = now or dt.datetime.now(dt.UTC)
    fields: dict[str, Any] = {"path": str(cert_file), "not_after": until.isoformat()}
    if until < moment:
        fields["hint"] = "the broker refuses it: re-enroll"
        out.append(("agent.client_certificate_expired", fields))
    elif until - moment < EXPIRY_WARNING:
        fields["hint"] = "re-enroll before it expires"
        out.append(("agent.client_certificate_expiring", fields))
    return out

"""`edgefleet devices ...`: the device inventory and enrollment tokens through the fleet API.

Why tokens live here: an operator enrolls a device by minting a one-time token
(`devices create-token`) and handing it to `edgefleet agent enroll` on the device; doing it
over the API (not `fleet create-token --data-dir`) works from any machine that has a key.

Routes: list `GET /v1/devices`, show `GET /v1/devices/{id}`, label `PUT .../labels`, revoke
`POST .../revoke`, create-token `POST /v1/enrollment-tokens`, tokens `GET /v1/enrollment-tokens`,
withdraw-token `DELETE /v1/enrollment-tokens/{id}`, set-report-key `PUT .../report-key`. Devices
have no create route (enrollment creates them) and no pause or resume.
"""

from __future__ import annotations

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option, parse_pairs, quote

DEVICE_COLUMNS: list[Column] = [
    ("id", "id"), ("online", "online"), ("labels", "labels"), ("agent", "agent_version"),
    ("active", lambda d: (d.get("reported_state") or {}).get("active_bundle")),
    ("last seen", "last_seen"), ("revoked", "revoked"),
]
DEVICE_FIELDS: list[Column] = [
    *DEVICE_COLUMNS, ("state", lambda d: (d.get("reported_state") or {}).get("state")),
    ("runtimes", "runtimes"), ("architecture", "architecture"), ("memory MB", "memory_mb"),
    ("enrolled", "enrolled_at"), ("broker user", "broker_username"), ("revoked at", "revoked_at"),
    ("identity", "identity"), ("certificate", "cert_serial"), ("cert expires", "cert_not_after"),
]
TOKEN_COLUMNS: list[Column] = [("id", "id"), ("labels", "labels"), ("expires", "expires_at"),
                               ("used", "used_at"), ("device", "device_id"), ("by", "created_by")]


@click.group(name="devices", context_settings=CONTEXT)
def group() -> None:
    """Device inventory over the fleet API: list, show, relabel, revoke, enrollment tokens."""


@group.command("list")
@click.option("--selector", default="", help="Label selector, e.g. 'env=prod,region in (eu,us),!legacy'.")
@click.option("--online/--offline", default=None, help="Only devices that are (not) online.")
@click.option("--revoked/--active", default=None, help="Only revoked (or only active) devices.")
@limit_option
@api_command
def list_devices(s: Session, selector: str, online: bool | None, revoked: bool | None,
                 limit: int | None) -> None:
    """List devices, filtered by a label selector and their online and revoked flags."""
    items = s.client.pages("/v1/devices", limit, selector=selector or None, online=_flag(online),
                           revoked=_flag(revoked))
    s.show_list(items, DEVICE_COLUMNS, "devices")


def _flag(value: bool | None) -> str | None:
    return None if value is None else str(value).lower()


@group.command("show")
@click.argument("device_id")
@api_command
def show(s: Session, device_id: str) -> None:
    """Show DEVICE_ID: inventory facts and the state it last reported (`--json` for all of it)."""
    s.show_record(s.client.get(f"/v1/devices/{quote(device_id)}"), DEVICE_FIELDS)


@group.command("label")
@click.argument("device_id")
@click.argument("labels")
@api_command
def label(s: Session, device_id: str, labels: str) -> None:
    """Replace the labels of DEVICE_ID with LABELS (`k=v,k2=v2`; '' clears them)."""
    row = s.client.put(f"/v1/devices/{quote(device_id)}/labels", {"labels": parse_pairs(labels, "LABELS")})
    s.show_record(row, DEVICE_FIELDS)


@group.command("revoke")
@click.argument("device_id")
@click.option("--reason", default="", help="Kept in the audit log.")
@api_command
def revoke(s: Session, device_id: str, reason: str) -> None:
    """Revoke DEVICE_ID: drop its broker login, reload the broker, clear its desired topic."""
    row = s.client.post(f"/v1/devices/{quote(device_id)}/revoke", {"reason": reason})
    if s.as_json:
        s.json(row)
        return
    s.show_record(row, [("id", "id"), ("revoked at", "revoked_at"), ("broker reloaded", "broker_reloaded"),
                        ("broker", "broker_detail"), ("desired cleared", "desired_cleared"),
                        ("desired", "desired_detail"), ("session ended", "session_ended"),
                        ("session", "session_detail")])
    if not row.get("broker_reloaded"):
        s.note("warning: the broker was not reloaded, so it still accepts this device: reload it by hand")


@group.command("set-report-key")
@click.argument("device_id")
@click.argument("public_key")
@api_command
def set_report_key(s: Session, device_id: str, public_key: str) -> None:
    """Register or rotate DEVICE_ID's report signing key PUBLIC_KEY (base64, from `edgefleet agent
    report-key` on the device), audited; resets its report counters."""
    row = s.client.put(f"/v1/devices/{quote(device_id)}/report-key", {"public_key": public_key})
    s.show_record(row, [("device", "device_id"), ("report key", "public_key")])

@group.command("create-token")
@click.option("--labels", default="", help="Labels the enrolled device gets, e.g. env=prod,region=eu.")
@click.option("--ttl", "ttl_seconds", type=click.IntRange(60), default=None,
              help="Seconds until the token expires (server default 24 h).")
@click.option("--idempotency-key", default=None, help="Retry-safe create: the same key replays the answer.")
@api_command
def create_token(s: Session, labels: str, ttl_seconds: int | None, idempotency_key: str | None) -> None:
    """Create a one-time enrollment token for `edgefleet agent enroll` (printed once, on stdout)."""
    body = {"labels": parse_pairs(labels, "--labels"), "ttl_seconds": ttl_seconds}
    row = s.client.post("/v1/enrollment-tokens", body, idempotency_key)
    if s.as_json:
        s.json(row)
        return
    s.note(f"created enrollment token {row['id']} (expires {row['expires_at']}); shown only once:")
    click.echo(row["token"])


@group.command("tokens")
@click.option("--unused", is_flag=True, help="Only tokens not used yet.")
@limit_option
@api_command
def tokens(s: Session, unused: bool, limit: int | None) -> None:
    """List enrollment tokens (never their secrets)."""
    s.show_list(s.client.pages("/v1/enrollment-tokens", limit, unused_only=_flag(unused or None)),
                TOKEN_COLUMNS, "enrollment tokens")


@group.command("withdraw-token")
@click.argument("token_id")
@api_command
def withdraw_token(s: Session, token_id: str) -> None:
    """Withdraw the unused enrollment token TOKEN_ID (a used one cannot be)."""
    s.client.delete(f"/v1/enrollment-tokens/{quote(token_id)}")
    if s.as_json:
        s.json({"id": token_id, "withdrawn": True})
    else:
        s.note(f"withdrew enrollment token {token_id}")


if __name__ == "__main__":  # `python -m fleet.cli.devices ...`, also without the installed entry point
    group(prog_name="edgefleet devices")

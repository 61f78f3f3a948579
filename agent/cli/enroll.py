"""`edgefleet agent enroll`: the device side of enrollment.

Why a command: provisioning a device by hand means copying an id, a broker password, a topic
prefix and a TUF root from one JSON answer into two files, and one wrong value (a topic
prefix with the device path already in it, a world-readable password) fails silently later.
This command exchanges a one-time token at `POST /v1/enroll` (docs/fleet-api.md) and writes a
config that `edgefleet agent run` accepts plus the trusted root next to it, both 0600 in a
0700 directory, or nothing at all.

With `--identity cert` the device makes an EC P-256 key pair (the private key never leaves
it), sends a CSR with the token, checks the certificate the fleet's device CA returns
(`agent/trust/client_cert.py`) and writes key, certificate and CA beside the config (0600);
the config then logs in to the broker's mutual-TLS listener with that certificate and no password.

Either way the device also makes its Ed25519 report key (`<state dir>/report.key`, 0600; the
private key never leaves it) and sends only the public half (`report_public_key`): the fleet
accepts reported state, events and telemetry only when signed by it (docs/trust.md).

Only the standard library speaks HTTP here: the agent must not depend on the fleet's extras.
Everything that can be checked before the token is spent (an existing config without
`--force`, the local options) is checked first, because a token works once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import platform
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from agent import __version__
from agent.config import parse_config
from agent.contract.report_auth import new_device_key
from agent.daemon.report_signer import COUNTER_FILE, KEY_FILE
from agent.durable_io import write_durably
from agent.errors import ConfigError, UntrustedDataError
from agent.runtimes import available_runtimes
from agent.trust.client_cert import KeyAndCsr, check_issued, is_pem_certificates, new_key_and_csr
from agent.trust.wrap_key import new_wrap_key, wrap_key_path, write_wrap_key

TOKEN_ENV = "EDGEFLEET_ENROLL_TOKEN"  # noqa: S105 - the variable's name, not a secret
URL_ENV = "EDGEFLEET_URL"
MAX_RESPONSE_BYTES = 2 * 1024 * 1024  # a TUF root is at most 1 MiB on the fleet side
_BROKER_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


class EnrollError(click.ClickException):
    """A one-line enrollment failure (exit 1, no traceback)."""


@dataclass(frozen=True)
class CertFiles:
    """Where `--identity cert` writes the device's key, its certificate and the CA that issued it."""

    key: Path
    cert: Path
    ca: Path

    @classmethod
    def beside(cls, config_path: Path) -> CertFiles:
        return cls(config_path.with_name("device.key"), config_path.with_name("device.crt"),
                   config_path.with_name("device-ca.crt"))


@dataclass(frozen=True)
class Enrolled:
    """The fleet's answer, with the header that says whether the broker knows the new login yet."""

    body: dict[str, Any]
    broker_reloaded: bool | None


def device_facts() -> dict[str, Any]:
    """What the fleet records about this device at enrollment (inventory columns)."""
    facts: dict[str, Any] = {"agent_version": __version__, "architecture": platform.machine() or None,
                             "runtimes": available_runtimes()}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        facts["memory_mb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return facts


def post_enroll(url: str, token: str, facts: dict[str, Any], timeout_s: float,
                cafile: Path | None = None) -> Enrolled:
    """Call `POST <url>/v1/enroll` with the token as Bearer. Raises EnrollError with one line."""
    if urlsplit(url).scheme not in ("http", "https"):  # never file:// or a custom opener
        raise EnrollError(f"{url!r} is not an http(s):// URL")
    endpoint = url.rstrip("/") + "/v1/enroll"
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        endpoint, data=json.dumps(facts).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 "Accept": "application/json", "User-Agent": f"edgefleet-agent/{__version__}"})
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:  # noqa: S310
            raw = response.read(MAX_RESPONSE_BYTES + 1)
            reloaded = response.headers.get("Edgefleet-Broker-Reloaded")
    except urllib.error.HTTPError as exc:
        detail = _detail(exc.read(64 * 1024))
        if exc.code == 401:
            raise EnrollError(f"the fleet refused the enrollment token: {detail} (tokens work once and "
                              "expire; ask an operator for a new one: `edgefleet devices create-token`)"
                              ) from None
        raise EnrollError(f"enrollment failed at {endpoint} ({exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise EnrollError(f"cannot reach the fleet at {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise EnrollError(f"cannot reach the fleet at {url}: {exc}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise EnrollError(f"the enrollment answer from {endpoint} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise EnrollError(f"{endpoint} did not answer JSON (is {url} the fleet API?)") from None
    if not isinstance(body, dict) or not isinstance(body.get("broker"), dict) or "device_id" not in body:
        raise EnrollError(f"{endpoint} answered something that is not an enrollment (no device_id/broker)")
    return Enrolled(body, None if reloaded is None else reloaded.lower() == "true")


def _detail(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300] or "no detail"
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    if isinstance(detail, list):  # the API's one error shape: [{"loc", "msg", "type"}, ...]
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


def broker_settings(url: str) -> dict[str, Any]:
    """`mqtt[s]://host[:port]` as the agent's `mqtt` host, port and tls (user info is ignored)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EnrollError(f"the fleet handed out a broker URL that cannot be used: {url!r} ({exc})") from None
    if parts.scheme not in _BROKER_SCHEMES or not parts.hostname:
        raise EnrollError(f"the fleet handed out a broker URL that is not mqtt(s)://host[:port]: {url!r}")
    tls, default_port = _BROKER_SCHEMES[parts.scheme]
    return {"host": parts.hostname, "port": port or default_port, "tls": tls}


def device_topic_prefix(prefix: str, device_id: str) -> str:
    """The topic root the agent config means (`<prefix>/v1/devices/<id>/...` is derived from it).

    A fleet from before that fix answered the device's own subtree; its suffix is dropped so
    the agent does not subscribe under `<prefix>/v1/devices/<id>/v1/devices/<id>/`.
    """
    suffix = f"/v1/devices/{device_id}"
    return prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix


def build_config(body: dict[str, Any], root_path: Path, state_dir: Path, api: dict[str, Any],
                 ca_file: Path | None, cert: CertFiles | None = None) -> dict[str, Any]:
    """The agent config document for this enrollment answer (with `cert`: a client certificate,
    no username or password: the broker takes the username from the certificate's CN)."""
    broker = body["broker"]
    device_id = str(body["device_id"])
    mqtt: dict[str, Any] = {**broker_settings(str(broker.get("url", ""))),
                            "client_id": broker.get("client_id") or device_id,
                            "username": broker.get("username"), "password": broker.get("password")}
    if cert is not None:
        mqtt.update(username=None, password=None, cert_file=str(cert.cert), key_file=str(cert.key))
    if ca_file is not None:
        mqtt["ca_file"] = str(ca_file)
    doc: dict[str, Any] = {
        "device_id": device_id,
        "labels": dict(body.get("labels") or {}),
        "state_dir": str(state_dir),
        "bootstrap_root": str(root_path),
        "topic_prefix": device_topic_prefix(str(broker.get("topic_prefix") or "edgefleet"), device_id),
        "mqtt": mqtt,
    }
    if api:
        doc["api"] = api
    return doc


def write_private(path: Path, data: bytes) -> None:
    """Atomically and durably replace `path` with `data`, mode 0600 from the first byte."""
    write_durably(path, data, mode=0o600)


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) 0700; an existing directory is left as it is."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask


@click.command("enroll")
@click.option("--url", envvar=URL_ENV, required=True, metavar="URL",
              help=f"The fleet API, e.g. https://fleet.example:8080 (env {URL_ENV}).")
@click.option("--token", envvar=TOKEN_ENV, prompt="Enrollment token", hide_input=True,
              help=f"One-time token from `edgefleet devices create-token` (env {TOKEN_ENV}; "
                   "prompted if absent).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/edgefleet/agent.json"), show_default=True, help="Agent config to write.")
@click.option("--root", "root_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the trusted TUF root (default: root.json beside the config).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/edgefleet"), show_default=True, help="The agent's state directory.")
@click.option("--unix-socket", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local inference socket (default /run/edgefleet/agent.sock).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="Local inference HTTP port on 127.0.0.1 (default 8780; 0 = any free port).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CA bundle for an mqtts:// broker (default: the one the fleet hands out, written to "
                   "broker-ca.crt beside the config, else the system's CAs).")
@click.option("--fleet-ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CA bundle for an https:// fleet URL (default: the system's CAs).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 600), default=30.0, show_default=True,
              help="Seconds to wait for the fleet.")
@click.option("--identity", type=click.Choice(["password", "cert"]), default="password", show_default=True,
              help="How the device logs in to the broker: a password, or a client certificate from the "
                   "fleet's device CA over a key made here (device.key, device.crt, device-ca.crt "
                   "beside the config).")
@click.option("--force", is_flag=True, help="Overwrite an existing config and root.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON (never the password).")
def enroll_command(url: str, token: str, config_path: Path, root_path: Path | None, state_dir: Path,
                   unix_socket: Path | None, http_port: int | None, ca_file: Path | None,
                   fleet_ca_file: Path | None, timeout_s: float, identity: str, force: bool,
                   as_json: bool) -> None:
    """Enroll this device: exchange a one-time TOKEN at the fleet for an id, broker credentials
    (a password, or with --identity cert a client certificate) and the trusted TUF root, and write
    an agent config and the root (0600, directory 0700)."""
    config_path = config_path.absolute()
    root_path = (root_path or config_path.with_name("root.json")).absolute()
    cert = CertFiles.beside(config_path) if identity == "cert" else None
    broker_ca_path = config_path.with_name("broker-ca.crt")  # if the fleet hands out the broker's CA
    report_key_path = state_dir.absolute() / KEY_FILE
    for path in (config_path, root_path, *((cert.key, cert.cert, cert.ca) if cert else ()),
                 wrap_key_path(state_dir.absolute()),
                 *(() if ca_file else (broker_ca_path,)), report_key_path):
        if path.exists() and not force:
            raise EnrollError(f"{path} exists (use --force to overwrite; the token was not used)")
    if urlsplit(url).scheme not in ("http", "https"):
        raise click.BadParameter(f"{url!r} is not an http(s):// URL", param_hint="--url")
    api: dict[str, Any] = {}
    if unix_socket is not None:
        api["unix_socket"] = str(unix_socket.absolute())
    if http_port is not None:
        api["http_port"] = http_port
    # Check the local choices with placeholder credentials before the token is spent.
    check_url = "mqtts://localhost" if cert else "mqtt://localhost"
    _validated(build_config({"device_id": "enroll-check", "broker": {"url": check_url}},
                            root_path, state_dir.absolute(), api, ca_file, cert), "the local options")
    facts = device_facts()
    pair = new_key_and_csr() if cert else None
    if pair is not None:
        facts["csr"] = pair.csr_pem
    wrap_pem, facts["wrap_public_key"] = new_wrap_key()  # bundle encryption (agent.trust.wrap_key)
    report_private, report_public = new_device_key()
    facts["report_public_key"] = base64.b64encode(report_public).decode()
    answer = post_enroll(url, token.strip(), facts, timeout_s, fleet_ca_file)
    body = answer.body
    enrolled = f"device {body['device_id']} is enrolled: ask an operator to revoke it"
    broker_ca = body["broker"].get("ca_pem")
    if ca_file is None and broker_ca is not None and not is_pem_certificates(broker_ca):
        raise EnrollError(f"the fleet's broker CA (broker.ca_pem) is not a PEM certificate ({enrolled})")
    use_ca = ca_file or (broker_ca_path if broker_ca is not None else None)  # --ca-file wins
    doc = build_config(body, root_path, state_dir.absolute(), api, use_ca, cert)
    _validated(doc, f"the fleet's answer ({enrolled})")
    for folder in {config_path.parent, root_path.parent, report_key_path.parent}:
        private_dir(folder)
    write_private(report_key_path, report_private)  # a new key starts a new counter
    (report_key_path.parent / COUNTER_FILE).unlink(missing_ok=True)
    if ca_file is None and broker_ca is not None:
        write_private(broker_ca_path, broker_ca.encode())
    if cert is not None and pair is not None:
        _write_identity(body, pair, cert, enrolled)
    try:
        write_wrap_key(state_dir.absolute(), wrap_pem)
    except OSError as exc:
        raise EnrollError(f"cannot write the wrap key under {state_dir}: {exc} ({enrolled})") from None
    root = body.get("tuf_root")
    if root is not None:
        write_private(root_path, json.dumps(root, indent=1).encode() + b"\n")
    write_private(config_path, json.dumps(doc, indent=2).encode() + b"\n")
    _report(doc, config_path, root_path if root is not None else None, answer.broker_reloaded, as_json)
    if root is None:
        raise EnrollError(f"the fleet has no TUF repository yet, so no root was written: copy the fleet's "
                          f"root.json to {root_path} before `edgefleet agent run --config {config_path}`")


def _write_identity(body: dict[str, Any], pair: KeyAndCsr, files: CertFiles, enrolled: str) -> None:
    """Check the issued certificate against our key, id and the CA sent with it; write all three 0600."""
    issued = body.get("certificate")
    if not isinstance(issued, dict) or not isinstance(issued.get("pem"), str) \
            or not isinstance(issued.get("ca_pem"), str):
        raise EnrollError(f"the fleet answered without a certificate ({enrolled}; does it support "
                          "certificate enrollment?)")
    try:
        check_issued(issued["pem"], issued["ca_pem"], pair, str(body["device_id"]))
    except UntrustedDataError as exc:
        raise EnrollError(f"refusing the fleet's certificate: {exc} ({enrolled})") from None
    write_private(files.key, pair.key_pem)
    write_private(files.cert, issued["pem"].encode())
    write_private(files.ca, issued["ca_pem"].encode())


def _validated(doc: dict[str, Any], what: str) -> None:
    try:
        parse_config(json.dumps(doc), "agent config")
    except ConfigError as exc:
        raise EnrollError(f"{what} do not make a valid agent config: {exc}") from None


def _report(doc: dict[str, Any], config_path: Path, root_path: Path | None, reloaded: bool | None,
            as_json: bool) -> None:
    mqtt = doc["mqtt"]
    broker = f"{'mqtts' if mqtt['tls'] else 'mqtt'}://{mqtt['host']}:{mqtt['port']}"
    login = f"certificate {mqtt['cert_file']}" if mqtt.get("cert_file") else str(mqtt["username"])
    if as_json:
        click.echo(json.dumps({"device_id": doc["device_id"], "labels": doc["labels"],
                               "config": str(config_path), "root": str(root_path) if root_path else None,
                               "broker": broker, "username": mqtt["username"],
                               "cert_file": mqtt.get("cert_file"), "key_file": mqtt.get("key_file"),
                               "topic_prefix": doc["topic_prefix"], "broker_reloaded": reloaded}, indent=2))
    else:
        labels = ", ".join(f"{k}={v}" for k, v in doc["labels"].items()) or "none"
        click.echo(f"enrolled as {doc['device_id']} (labels: {labels})")
        click.echo(f"wrote {config_path} (0600): broker {broker} as {login}, "
                   f"topic prefix {doc['topic_prefix']}, state in {doc['state_dir']}")
        if mqtt.get("key_file"):
            click.echo(f"wrote {mqtt['key_file']} (0600): this device's private key (it never left it)")
        click.echo(f"wrote {Path(doc['state_dir']) / KEY_FILE} (0600): this device's report signing key")
        if root_path is not None:
            click.echo(f"wrote {root_path} (0600): the trusted TUF root")
        click.echo(f"start the agent with: edgefleet agent run --config {config_path}")
    if reloaded is False and mqtt.get("password"):  # a certificate is not in the password file
        click.echo("warning: the fleet did not reload the broker: if Mosquitto uses the fleet's password "
                   "file, this login works only after it is reloaded (the agent keeps retrying)", err=True)

"""Enrollment routes: operators mint one-time tokens; devices exchange one at /v1/enroll."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from fleet.access.auth import Operator, bearer
from fleet.access.credentials import EnrollmentToken
from fleet.api.deps import Paging, SettingsDep, StoreDep, idempotent_create
from fleet.api.schemas import EnrollIn, EnrollOut, PageOf, TokenCreate, TokenCreated, TokenOut
from fleet.db.paging import Page
from fleet.db.rows import Row
from fleet.devices.broker_reload import reload_broker
from fleet.devices.enrollment import CertRequest, create_enrollment_token, enroll_device, load_broker_ca
from fleet.errors import AuthError, FleetInputError, FleetMisuseError
from fleet.settings import FleetSettings
from fleet.trust.device_ca import DeviceCA, parse_csr

router = APIRouter(prefix="/v1", tags=["enrollment"])


@router.post("/enrollment-tokens", response_model=TokenCreated, status_code=201,
             summary="Create a one-time, expiring enrollment token (shown once)")
def create_token(body: TokenCreate, request: Request, store: StoreDep, settings: SettingsDep,
                 who: Operator) -> JSONResponse:
    ttl = body.ttl_seconds or settings.limits.token_ttl_seconds
    if ttl > settings.limits.max_token_ttl_seconds:
        raise FleetInputError(f"ttl_seconds must be at most {settings.limits.max_token_ttl_seconds}")

    def create() -> Row:
        row, plaintext = create_enrollment_token(store, body.labels, ttl, who.actor)
        return {**row.to_dict(), "token": plaintext}

    return idempotent_create(request, who, body, TokenCreated, create, shown_once="token")


@router.get("/enrollment-tokens", response_model=PageOf[TokenOut], summary="List enrollment tokens")
def list_tokens(_: Operator, store: StoreDep, page: Paging,
                unused_only: bool = False) -> Page[EnrollmentToken]:
    return store.access.list_tokens(page.cursor, page.limit, unused_only)


@router.delete("/enrollment-tokens/{token_id}", status_code=204, summary="Withdraw an unused token")
def delete_token(token_id: str, store: StoreDep, who: Operator) -> Response:
    store.access.delete_token(token_id, who.actor)
    return Response(status_code=204)


def enrollment_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The presented enrollment token; 401 before the body is even looked at when absent."""
    if creds is None:
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <enrollment token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return creds.credentials


def cert_request(settings: FleetSettings, csr: str) -> CertRequest:
    """What a CSR enrollment needs from the fleet's set-up.

    Raises FleetInputError (422): a malformed CSR, whatever the set-up; FleetMisuseError (503): no
    device CA, no mutual-TLS URL."""
    parse_csr(csr)
    url = settings.device_cert_broker
    if url is None:
        raise FleetMisuseError("certificate enrollment needs the broker's mutual-TLS listener: set "
                               "device_cert_broker_url (EDGEFLEET_DEVICE_CERT_BROKER_URL) to mqtts://host:port")
    return CertRequest(csr, DeviceCA.open(settings.device_ca_dir), settings.device_cert_days * 86400.0, url)


@router.post("/enroll", response_model=EnrollOut, status_code=201,
             responses={401: {"description": "Token missing, unknown, used or expired"},
                        422: {"description": "Bad facts, or a CSR that is not PEM or whose signature fails"},
                        503: {"description": "CSR sent but the fleet has no device CA or mutual-TLS URL"}},
             summary="Device: exchange an enrollment token (as Bearer) for identity and credentials")
def enroll(
    token: Annotated[str, Depends(enrollment_token)],
    body: EnrollIn,
    store: StoreDep,
    settings: SettingsDep,
) -> JSONResponse:
    cert = cert_request(settings, body.csr) if body.csr is not None else None
    broker_ca = load_broker_ca(settings.device_broker_ca_file)  # before the token: a bad file is 503
    try:
        facts = body.model_dump(exclude={"csr"})
        out = enroll_device(store, token, facts, settings.device_broker,  # no fleet login
                            settings.topic_prefix, settings.repo_dir, settings.broker_passwd_path, cert,
                            broker_ca)
    except AuthError as exc:
        # One answer for unknown, used and expired tokens, so callers cannot probe them.
        raise AuthError("invalid, used or expired enrollment token") from exc
    # The new login works only once the broker re-reads the file: logged, and told in a header.
    reload = reload_broker(settings)
    return JSONResponse(EnrollOut.model_validate(out).model_dump(mode="json"), 201,
                        headers={"Edgefleet-Broker-Reloaded": "true" if reload.reloaded else "false"})

"""API key routes (admin only): create (key shown once), list, read, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fleet.access.auth import Admin, create_api_key
from fleet.access.credentials import ApiKey
from fleet.api.deps import Paging, StoreDep, idempotent_create
from fleet.api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, PageOf
from fleet.db.paging import Page
from fleet.db.rows import Row

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])


@router.post("", response_model=ApiKeyCreated, status_code=201, summary="Create an API key (shown once)")
def create_key(body: ApiKeyCreate, request: Request, store: StoreDep, who: Admin) -> JSONResponse:
    def create() -> Row:
        row, plaintext = create_api_key(store, body.name, body.role, who.actor)
        return {**row.to_dict(), "key": plaintext}

    return idempotent_create(request, who, body, ApiKeyCreated, create, shown_once="key")


@router.get("", response_model=PageOf[ApiKeyOut], summary="List API keys (never their secrets)")
def list_keys(_: Admin, store: StoreDep, page: Paging) -> Page[ApiKey]:
    return store.access.list_api_keys(page.cursor, page.limit)


@router.get("/{key_id}", response_model=ApiKeyOut, summary="Read an API key's record")
def get_key(key_id: str, store: StoreDep, _: Admin) -> ApiKey:
    return store.access.get_api_key(key_id)


@router.post("/{key_id}/revoke", response_model=ApiKeyOut,
             responses={409: {"description": "Already revoked, or the last admin key"}},
             summary="Revoke an API key")
def revoke_key(key_id: str, store: StoreDep, who: Admin) -> ApiKey:
    return store.access.revoke_api_key(key_id, who.actor)

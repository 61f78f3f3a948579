"""Liveness (the only unauthenticated API route) and the caller's identity."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.access.auth import Viewer
from fleet.api.schemas import WhoAmI

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process answers (touches nothing)")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/whoami", response_model=WhoAmI, summary="The calling key's identity and role")
def whoami(principal: Viewer) -> WhoAmI:
    return WhoAmI(key_id=principal.key_id, name=principal.name, role=principal.role)

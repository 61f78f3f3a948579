"""Audit log route: every change with actor, action, resource, before and after (newest first)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet.access.auth import Viewer
from fleet.api.deps import Paging, StoreDep
from fleet.api.schemas import AuditOut, PageOf
from fleet.db.audit import AuditEntry
from fleet.db.paging import Page

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Filter = Annotated[str | None, Query(max_length=300)]


@router.get("", response_model=PageOf[AuditOut], summary="Read the audit log, newest first")
def list_audit(_: Viewer, store: StoreDep, page: Paging, resource: Filter = None, actor: Filter = None,
               action: Filter = None) -> Page[AuditEntry]:
    return store.audit.list(page.cursor, page.limit, resource, actor, action)

"""The API's one error shape, in the answers and in the OpenAPI document.

Every error body is FastAPI's validation shape, `{"detail": [{"loc": [...], "msg": "...",
"type": "..."}]}`, whatever the status (400, 401, 403, 404, 409, 413, 422, 503). Why this one
and not a string: schema errors cannot be a single string without losing which field each
problem is about, the OpenAPI document already declared the list for 422, and a client
then parses one shape for every failure. Domain errors carry their sentence in `msg` with an
empty `loc`, or the field they are about when one is (`field_error`); 401/403 name the
`Authorization` header.

`document_errors(app)` makes the OpenAPI document say so: every operation lists the error
statuses it can answer, each with the `Error` schema (the old `HTTPValidationError`
references point to it too), so the schema and the answers agree (checked by the bounded
Schemathesis run in tests/fleet/api/test_api_schemathesis.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_body", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "value_error",
               503: "unavailable"}
DESCRIPTIONS = {
    400: "The request body could not be decoded (not UTF-8 JSON text)",
    401: "API key (or enrollment token) missing, unknown or revoked",
    403: "The key's role is too low",
    404: "A named resource does not exist",
    409: "Conflicts with the stored state (duplicate, refused transition, idempotency key reused)",
    413: "Request body larger than the limit",
    422: "Invalid input: each problem with its field path (`loc`), or a domain error with `loc` empty",
    503: "Server misconfiguration (e.g. repository or keys unusable)",
}
ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
_ITEM_SCHEMA = {
    "title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
    "properties": {
        "loc": {"title": "Location", "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"title": "Message", "type": "string"},
        "type": {"title": "Error Type", "type": "string"},
        "input": {"title": "Input"},
        "ctx": {"title": "Context", "type": "object"},
    },
}


def error_body(status: int, msg: str, loc: Sequence[str | int] = ()) -> dict[str, Any]:
    """`{"detail": [{"loc": [...], "msg": msg, "type": <by status>}]}`."""
    return {"detail": [{"loc": list(loc), "msg": msg, "type": ERROR_TYPES.get(status, "error")}]}


def error_response(status: int, msg: str, loc: Sequence[str | int] = (),
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, msg, loc), status, headers=headers)


def field_error(loc: tuple[str | int, ...], msg: str, value: Any) -> RequestValidationError:
    """A 422 naming the field, for checks no schema can express (a path on the server)."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error", "input": value}])


def document_errors(app: FastAPI) -> None:
    """Declare the error statuses with the `Error` schema in `app`'s OpenAPI document (once, lazily)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _declare(build())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def _statuses(method: str, op: dict[str, Any]) -> set[int]:
    """What an operation can answer besides success, from what it takes."""
    out: set[int] = set()
    if op.get("security"):
        out |= {401, 403, 404, 422, 503}
        if method in ("post", "put", "patch", "delete"):
            out.add(409)
    if op.get("parameters"):
        out.add(422)
    if "requestBody" in op:
        out |= {400, 413, 422}
    return out


def _declare(doc: dict[str, Any]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas["ValidationError"] = _ITEM_SCHEMA
    schemas["Error"] = {
        "title": "Error", "type": "object", "required": ["detail"],
        "description": "Every error: one entry per problem (see docs/fleet-api.md, Errors).",
        "properties": {"detail": {"title": "Detail", "type": "array",
                                  "items": {"$ref": "#/components/schemas/ValidationError"}}},
    }
    for ops in doc.get("paths", {}).values():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for status in _statuses(method, op):
                responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}

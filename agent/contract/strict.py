"""`StrictStruct`: the base of every typed message, manifest and config the agent parses.

Why msgspec rather than pydantic here: the agent daemon is a long-running process on small
gateways, and pydantic (its Rust core, its schema machinery and one validator per model) cost
the idle daemon about 10 MB of RSS; msgspec validates the same declarations (types, `Meta`
constraints, unknown fields refused) for about 1.6 MB. The fleet keeps pydantic for its API.

The method names follow pydantic's (`model_validate`, `model_dump`, `model_copy`, ...) on
purpose: the fleet, the simulators and the tests handle these types beside the fleet's own
pydantic models, and one vocabulary for both keeps those call sites honest and short.

Semantics:
- decoding (`model_validate`, `model_validate_json`) checks types and constraints and then
  each struct's `_check` (cross-field rules, normalisation), refusing unknown fields;
- direct construction (`TargetRef(path=..., ...)`) runs the same checks, as pydantic did, so
  the fleet cannot build a message the agent would refuse;
- every failure is a `msgspec.ValidationError` (a `ValueError`) naming the path, e.g.
  ``Expected `int` >= 1 - at `$.sequence```; the contract's `parse_*` functions wrap it in the
  agent's `UntrustedDataError` subclasses.
"""

from __future__ import annotations

import inspect
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self, cast

import msgspec
import msgspec.json
import msgspec.structs

ValidationError = msgspec.ValidationError
field = msgspec.field
Meta = msgspec.Meta

_decoding = threading.local()


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is Path:
        if isinstance(obj, Path):
            return obj
        if isinstance(obj, str) and obj:
            return Path(obj)
        raise ValueError(f"Expected a path string, got {obj!r}")
    raise TypeError(f"unsupported type {tp!r}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _python(value: Any, exclude_none: bool) -> Any:
    """Structs to dicts (recursively), leaving leaf objects (datetime, Path) as they are."""
    if isinstance(value, msgspec.Struct):
        out = {}
        for name in value.__struct_fields__:
            item = getattr(value, name)
            if item is None and exclude_none:
                continue
            out[name] = _python(item, exclude_none)
        return out
    if isinstance(value, list | tuple):
        return [_python(v, exclude_none) for v in value]
    if isinstance(value, dict):
        return {k: _python(v, exclude_none) for k, v in value.items()}
    return value


_prepared: set[type] = set()
_prepare_lock = threading.RLock()  # re-entrant: harmless if building a type ever built a struct


def _prepare(cls: type) -> None:
    """Build msgspec's type information for `cls` (and the structs it holds) on one thread only.

    msgspec builds it lazily at a type's first decode or convert, and two threads doing that
    first use at the same moment can crash the interpreter (msgspec 0.22, seen here as a
    segfault in 16 of 40 runs of 8 threads decoding a fresh `Manifest`; in the swarm, a worker
    whose devices verified their first bundle together died). After the first use of each
    type this is one set lookup.
    """
    if cls in _prepared:
        return
    with _prepare_lock:
        if cls not in _prepared:
            msgspec.json.Decoder(cls, dec_hook=_dec_hook)
            _prepared.add(cls)


class _Decoding:
    """Marks this thread as decoding, so nested `__post_init__` calls skip re-validation."""

    def __enter__(self) -> None:
        _decoding.depth = getattr(_decoding, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _decoding.depth -= 1


class StrictStruct(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Frozen, keyword-only, unknown fields refused; see the module docstring for semantics."""

    def __post_init__(self) -> None:
        if not getattr(_decoding, "depth", 0):
            # Built directly: run the checks decoding runs (types, Meta constraints, nested).
            _prepare(type(self))
            with _Decoding():
                msgspec.convert(_python(self, False), type(self), dec_hook=_dec_hook)
        self._check()

    def _check(self) -> None:
        """Cross-field rules and normalisation; raise `ValueError` to refuse (override)."""

    def _normalise(self, name: str, value: Any) -> None:
        """Replace a field's value from `_check` (the struct is frozen to everyone else)."""
        msgspec.structs.force_setattr(self, name, value)

    @classmethod
    def model_validate(cls, obj: Any) -> Self:
        """Validate a dict (or an instance) into this type. Raises `ValidationError`."""
        if isinstance(obj, cls):
            return obj
        _prepare(cls)
        with _Decoding():
            return msgspec.convert(obj, cls, dec_hook=_dec_hook)

    @classmethod
    def model_validate_json(cls, data: bytes | bytearray | memoryview | str) -> Self:
        """Decode and validate JSON. Raises `ValidationError` (also for malformed JSON)."""
        _prepare(cls)
        try:
            with _Decoding():
                return msgspec.json.decode(data, type=cls, dec_hook=_dec_hook)
        except msgspec.ValidationError:
            raise
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise msgspec.ValidationError(f"not valid JSON: {exc}") from None

    def model_dump(
        self, *, mode: Literal["python", "json"] = "python", exclude_none: bool = False
    ) -> dict[str, Any]:
        """Fields as a dict; `mode="json"` turns datetimes and paths into strings as JSON would."""
        data = _python(self, exclude_none)
        if mode == "json":
            data = msgspec.to_builtins(data, enc_hook=_enc_hook)
        return cast(dict[str, Any], data)

    def model_dump_json(self, *, exclude_none: bool = False, indent: int | None = None) -> str:
        """JSON in field order: compact, or indented by `indent` spaces for files people read."""
        data = msgspec.json.encode(self.model_dump(exclude_none=exclude_none), enc_hook=_enc_hook)
        return (msgspec.json.format(data, indent=indent) if indent is not None else data).decode()

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Self:
        """A copy with `update` applied, validated like a direct construction."""
        return msgspec.structs.replace(self, **(update or {}))

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        """JSON Schema of this type (constraints included; `_check` rules are in docstrings)."""
        _prepare(cls)
        schema: dict[str, Any] = clean_schema_descriptions(msgspec.json.schema(cls))
        return schema

    # The fleet's pydantic models hold these structs as fields (a bundle's metadata holds its
    # health policy). pydantic calls these hooks only when it builds such a model, so the agent
    # never imports pydantic; validation and dumping stay msgspec's.
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.model_validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: value.model_dump(mode="json")
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "object", "title": cls.__name__, "description": (cls.__doc__ or "").strip()}


def clean_schema_descriptions(node: Any) -> Any:
    """Every `description` in a JSON Schema as `inspect.cleandoc` leaves it.

    msgspec copies docstrings into schemas verbatim up to 0.22 and dedented from 0.23; cleaning
    them here makes the published schema a function of our code, not of msgspec's version.
    """
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
            else clean_schema_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [clean_schema_descriptions(v) for v in node]
    return node


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]+)`$")


def describe(exc: msgspec.ValidationError) -> str:
    """`path.to.field: problem`, the form every `parse_*` error and config error uses."""
    m = _AT.match(str(exc))
    msg, path = (m["msg"], (m["path"] or "").lstrip(".")) if m else (str(exc), "")
    named = _FIELD.match(msg)
    if named:
        path = f"{path}.{named['name']}" if path else named["name"]
        unknown = named["what"] == "contains unknown"
        msg = "unknown field (not allowed)" if unknown else "required field missing"
    return f"{path}: {msg}" if path else msg


def utc_timestamp(value: datetime) -> datetime:
    """Refuse naive datetimes; return `value` in UTC, whole seconds (canonical JSON has no fractions)."""
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (UTC)")
    return value.astimezone(UTC).replace(microsecond=0)

"""Kubernetes-style label selectors: parsed once, matched in Python or compiled to SQL.

Grammar (comma = AND): `key=value`, `key==value`, `key!=value`, `key in (a,b)`,
`key notin (a,b)`, `key` (label exists), `!key` (label absent). Keys and values use the
Kubernetes character set, which also makes them safe to place in a JSON path.

Unlike Kubernetes, a comparison needs a value: `site=` and `site==` are refused. They are
almost always a typo (a rollout to `site==` reached no device and ran forever), and "has the
label" / "lacks the label" are written `site` / `!site`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fleet.db.sql import json_key, json_text
from fleet.errors import FleetInputError

Op = Literal["eq", "ne", "in", "notin", "exists", "absent"]
KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<vals>[^()]*)\)$")
_CMP_RE = re.compile(r"^(?P<key>[^=!\s]+)\s*(?P<op>==|=|!=)\s*(?P<val>\S*)$")
MAX_SELECTOR_LEN = 1024
MAX_REQUIREMENTS = 32


@dataclass(frozen=True)
class Requirement:
    """One clause of a selector."""

    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "absent":
            return not present
        if self.op == "eq":
            return value == self.values[0]
        if self.op == "ne":
            return value != self.values[0]
        if self.op == "in":
            return value in self.values
        return value not in self.values  # notin: also true when the label is absent (as in k8s)


@dataclass(frozen=True)
class Selector:
    """A conjunction of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def to_sql(self, dialect: str, column: str = "labels") -> tuple[str, dict[str, str]]:
        """A WHERE fragment over a JSON text column and its named parameters (`TRUE` when empty),
        for `dialect` (`sqlite` or `postgresql`; see `fleet.db.sql.json_text`).

        `column` must be a trusted identifier; keys and values travel as parameters (`sel_*`).
        """
        clauses: list[str] = []
        params: dict[str, str] = {}
        for i, r in enumerate(self.requirements):
            params[f"sel_k{i}"] = json_key(dialect, r.key)
            expr = json_text(dialect, column, f"sel_k{i}")
            marks = ", ".join(f":sel_v{i}_{j}" for j in range(len(r.values)))
            params.update({f"sel_v{i}_{j}": v for j, v in enumerate(r.values)})
            if r.op == "exists":
                clauses.append(f"{expr} IS NOT NULL")
            elif r.op == "absent":
                clauses.append(f"{expr} IS NULL")
            elif r.op in ("eq", "in"):
                clauses.append(f"{expr} IN ({marks})")
            else:
                clauses.append(f"({expr} IS NULL OR {expr} NOT IN ({marks}))")
        return (" AND ".join(clauses) or "TRUE"), params

    def __str__(self) -> str:
        parts = []
        for r in self.requirements:
            if r.op == "exists":
                parts.append(r.key)
            elif r.op == "absent":
                parts.append("!" + r.key)
            elif r.op in ("eq", "ne"):
                parts.append(f"{r.key}{'=' if r.op == 'eq' else '!='}{r.values[0]}")
            else:
                parts.append(f"{r.key} {r.op} ({','.join(r.values)})")
        return ",".join(parts)


def _split(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, buf = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FleetInputError(f"label selector {text!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    if depth != 0:
        raise FleetInputError(f"label selector {text!r}: unbalanced '('")
    parts.append(buf)
    return [p.strip() for p in parts]


def _check_key(key: str, clause: str) -> str:
    if not KEY_RE.match(key):
        raise FleetInputError(f"label selector clause {clause!r}: invalid label key {key!r}")
    return key


def _check_value(value: str, clause: str) -> str:
    if not VALUE_RE.match(value):
        raise FleetInputError(f"label selector clause {clause!r}: invalid label value {value!r}")
    return value


def parse_selector(text: str) -> Selector:
    """Parse a selector string; raises FleetInputError saying which clause is wrong."""
    text = text.strip()
    if len(text) > MAX_SELECTOR_LEN:
        raise FleetInputError(f"label selector longer than {MAX_SELECTOR_LEN} characters")
    if not text:
        return Selector()
    reqs: list[Requirement] = []
    for clause in _split(text):
        if not clause:
            raise FleetInputError(f"label selector {text!r}: empty clause")
        if m := _SET_RE.match(clause):
            vals = tuple(_check_value(v.strip(), clause) for v in m["vals"].split(","))
            if not m["vals"].strip():
                raise FleetInputError(f"label selector clause {clause!r}: empty value set")
            reqs.append(Requirement(_check_key(m["key"], clause), m["op"], vals))  # type: ignore[arg-type]
        elif m := _CMP_RE.match(clause):
            op: Op = "ne" if m["op"] == "!=" else "eq"
            if not m["val"]:
                raise FleetInputError(
                    f"label selector clause {clause!r}: no value after {m['op']!r} (write "
                    f"{m['key'] + m['op']}VALUE, {m['key']!r} for 'has the label' or "
                    f"'!{m['key']}' for 'lacks it')")
            reqs.append(Requirement(_check_key(m["key"], clause), op, (_check_value(m["val"], clause),)))
        elif clause.startswith("!"):
            reqs.append(Requirement(_check_key(clause[1:].strip(), clause), "absent"))
        else:
            reqs.append(Requirement(_check_key(clause, clause), "exists"))
        if len(reqs) > MAX_REQUIREMENTS:
            raise FleetInputError(f"label selector has more than {MAX_REQUIREMENTS} clauses")
    return Selector(tuple(reqs))


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Check label keys and values; raises FleetInputError naming the offending label."""
    for key, value in labels.items():
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise FleetInputError(f"invalid label key {key!r}")
        if not isinstance(value, str) or not VALUE_RE.match(value):
            raise FleetInputError(f"invalid value {value!r} for label {key!r}")
    return dict(labels)

"""Graph walks over a declarative transition table (the agent's lifecycle, the fleet's rollouts)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import TypeVar

S = TypeVar("S")


def graph(states: Iterable[S], transitions: Mapping[tuple[S, object], S]) -> dict[S, set[S]]:
    """state -> the states one transition reaches from it."""
    g: dict[S, set[S]] = {s: set() for s in states}
    for (src, _), dst in transitions.items():
        g[src].add(dst)
    return g


def reachable(start: S, g: Mapping[S, set[S]]) -> set[S]:
    """Every state reachable from `start` (itself included)."""
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in g[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen

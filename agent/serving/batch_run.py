"""One micro-batch of the Unix server's event loop: which requests share a run, and the replies.

Kept apart from the loop's socket I/O (`agent.serving.batch_loop`): this module gets parsed
requests and gives back each request's reply as `sendmsg` parts, so the rules that keep
batching correct sit in one place:

- requests are stacked only when the model's every input has a dynamic first dimension and
  they share names, dtypes and trailing dimensions (at most `max_rows` rows a run);
- a stacked run that fails, or whose outputs are not one row per input row, is re-run
  request by request, so each request gets its own verdict;
- one model (`InferenceService.target()`) for the whole batch; each request's prediction ids
  are its own rows of the batch's (consecutive) ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import MessageError, MisuseError
from agent.serving import wire
from agent.serving.api import InferenceService, Predictor


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching of the Unix socket's predict requests (`agent.serving.batch_loop`)."""

    window_us: float = 0.0  # wait this long after the first request for more (0: only what is there)
    max_rows: int = 64  # rows of one batch (requests beyond wait for the next)

    def __post_init__(self) -> None:
        if not 0 <= self.window_us <= 10_000 or self.max_rows < 1:
            raise MisuseError("batching: window_us must be in [0, 10000] and max_rows >= 1")


#: One reply: the request's owner (the loop's connection), `sendmsg` parts, their total size.
Reply = tuple[Any, list[Any], int]


class Request:
    """One parsed predict request; `key` says which others it may be stacked with (None: none)."""

    __slots__ = ("arrays", "key", "owner", "rows")

    def __init__(self, owner: Any, arrays: dict[str, np.ndarray]) -> None:
        self.owner = owner
        self.arrays = arrays
        key: list[Any] = []
        rows = -1
        for name, arr in arrays.items():
            if not arr.ndim or (rows >= 0 and arr.shape[0] != rows):
                rows = -2
                break
            rows = arr.shape[0]
            key.append((name, arr.dtype, arr.shape[1:]))
        self.rows = rows
        self.key: tuple[Any, ...] | None = tuple(key) if rows > 0 else None


def batchable(target: Predictor) -> bool:
    """Whether the model's every input has a dynamic first dimension (so rows can be stacked)."""
    try:
        inputs = target.info().get("inputs") or []
    except Exception:
        return False
    return bool(inputs) and all(
        isinstance(spec, dict) and next(iter(spec.get("shape") or [0])) is None for spec in inputs
    )


def groups(pending: list[Request], stack: bool, max_rows: int) -> list[list[Request]]:
    """Runs of requests, in arrival order within each: stackable requests together (at most
    `max_rows` rows a run, a larger request alone), every other request alone."""
    by_key: dict[Any, list[Request]] = {}
    for i, r in enumerate(pending):
        by_key.setdefault(r.key if stack and r.key is not None else i, []).append(r)
    out: list[list[Request]] = []
    for group in by_key.values():
        chunk: list[Request] = []
        rows = 0
        for r in group:
            if chunk and rows + r.rows > max_rows:
                out.append(chunk)
                chunk, rows = [], 0
            chunk.append(r)
            rows += r.rows
        out.append(chunk)
    return out


@dataclass(slots=True)
class Outcome:
    """What one request of a batch got: its rows of the outputs with the model and its first
    prediction id and their count ("", 0 without ids), or the error that refused it."""

    request: Request
    outputs: dict[str, np.ndarray] | None
    model: dict[str, str]
    first: str = ""
    count: int = 0
    error: BaseException | None = None


def outcomes(
    service: InferenceService, pending: list[Request], max_rows: int
) -> tuple[list[Outcome], int, int]:
    """Run `pending` as few runs as the rules allow; returns every request's outcome (never an
    exception), the number of stacked runs and the requests in them. Each transport writes the
    outcomes its own way (`run` below for sockets; the shared-memory poller in place)."""
    done: list[Outcome] = []
    try:
        target = service.target()
    except Exception as exc:
        return [Outcome(r, None, {}, error=exc) for r in pending], 0, 0
    stack = len(pending) > 1 and batchable(target)
    batches = batched = 0
    for group in groups(pending, stack, max_rows):
        if len(group) == 1 or not _run_stacked(service, target, group, done):
            done.extend(_run_one(service, target, r) for r in group)
        else:
            batches += 1
            batched += len(group)
    return done, batches, batched


def run(
    service: InferenceService, pending: list[Request], max_rows: int, templates: wire.ReplyTemplates
) -> tuple[list[Reply], int, int]:
    """`outcomes`, each as its reply (a result or an error frame) in `sendmsg` parts."""
    done, batches, batched = outcomes(service, pending, max_rows)
    return [_reply(o, templates) for o in done], batches, batched


def _run_stacked(service: InferenceService, target: Predictor, group: list[Request],
                 done: list[Outcome]) -> bool:
    """One run for the whole group; False (nothing added) when it must be re-run one by one."""
    stacked = {n: np.concatenate([r.arrays[n] for r in group]) for n in group[0].arrays}
    total = sum(r.rows for r in group)
    try:
        outputs, model, ids = service.run_on(target, stacked, len(group))
        if any(not a.ndim or a.shape[0] != total for a in outputs.values()):
            return False  # not one row per input row: cannot be split
    except Exception:
        return False
    at = 0
    for r in group:
        end = at + r.rows
        out = {k: v[at:end] for k, v in outputs.items()}
        done.append(Outcome(r, out, model, ids[at] if ids else "", r.rows if ids else 0))
        at = end
    return True


def _run_one(service: InferenceService, target: Predictor, r: Request) -> Outcome:
    try:
        outputs, model, ids = service.run_on(target, r.arrays)
    except Exception as exc:
        return Outcome(r, None, {}, error=exc)
    return Outcome(r, outputs, model, ids[0] if ids else "", len(ids) if ids else 0)


def _reply(o: Outcome, templates: wire.ReplyTemplates) -> Reply:
    """The outcome as `sendmsg` parts and their total size (an error frame for an error)."""
    if o.outputs is None:
        return _error(o.request, o.error or RuntimeError("no outputs"))
    try:
        parts, total = templates.parts(o.outputs, o.model["name"], o.model["version"], o.first, o.count)
    except MessageError as exc:  # an output dtype the wire does not carry
        frame = wire.error_frame(500, "runtime_failure", str(exc), False)
        return o.request.owner, [frame], len(frame)
    return o.request.owner, parts, total


def _error(r: Request, exc: BaseException) -> Reply:
    frame = wire.error_frame_of(exc)
    return r.owner, [frame], len(frame)

"""The local inference API's transport-independent core.

Applications on the gateway reach the active model over HTTP on 127.0.0.1
(`agent.serving.http_server`) or a Unix domain socket with a small length-prefixed framing
(`agent.serving.unix_server`); both decode requests into arrays, call one `Predictor`, and
map errors to the same status codes here, so a bad request gets the same 4xx and message on
either transport. The `Predictor` is deliberately tiny so the daemon can plug in a holder
whose model is swapped under running servers (`PredictorSlot` is one).

The Unix socket's frames live beside it: binary EFB1 predict frames in `agent.serving.wire`,
JSON-headed EFI1 frames in `agent.serving.efi1` (see docs/inference-api.md).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.errors import (
    EdgefleetError,
    FeedbackDisabledError,
    InputValidationError,
    MessageError,
    NoModelLoadedError,
    RequestTooLargeError,
    RuntimeFailure,
)
from agent.logs import log_event

_log = logging.getLogger("edgefleet.inference_api")



@runtime_checkable
class Predictor(Protocol):
    """What the API serves: `agent.runtimes.LoadedModel` is one, `PredictorSlot` wraps a swappable one.

    A swappable predictor should also offer `snapshot() -> Predictor` (see `PredictorSlot`): the
    API then runs and reports one model per request even if a swap happens in between.
    """

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. Raises `InputValidationError`, `NoModelLoadedError` or `RuntimeFailure`."""
        ...

    def info(self) -> dict[str, Any]:
        """At least `name`, `version`, `inputs` (list of {name, dtype, shape}) and `outputs`."""
        ...


class PredictorSlot:
    """A minimal swappable `Predictor` for embedding the servers without the daemon.

    The daemon serves through `agent.daemon.served_model.ServedModel`, which wraps the lifecycle's
    `agent.serving.model_holder.ModelHolder` (standby, shadow, drain); this slot is for tools and tests that
    only need "the model served right now".

    Swapping is one reference assignment, so a request in flight finishes on the model it
    started with and no request fails during a swap.
    """

    def __init__(self, predictor: Predictor | None = None) -> None:
        self._current = predictor

    def set(self, predictor: Predictor | None) -> Predictor | None:
        """Serve `predictor` from now on (None = no model); returns the one it replaced."""
        old, self._current = self._current, predictor
        return old

    def get(self) -> Predictor | None:
        """The predictor currently served, if any."""
        return self._current

    def snapshot(self) -> Predictor:
        """The current model, pinned for one request so its outputs and reported version agree.

        Raises `NoModelLoadedError` if there is none.
        """
        current = self._current
        if current is None:
            raise NoModelLoadedError("no model is loaded yet")
        return current

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Delegate to the current model. Raises `NoModelLoadedError` if there is none."""
        current = self._current
        if current is None:
            raise NoModelLoadedError("no model is loaded yet")
        return current.predict(inputs)

    def info(self) -> dict[str, Any]:
        """The current model's info. Raises `NoModelLoadedError` if there is none."""
        current = self._current
        if current is None:
            raise NoModelLoadedError("no model is loaded yet")
        return current.info()


@runtime_checkable
class FeedbackSink(Protocol):
    """Where prediction ids come from and labels go (the daemon's telemetry tap is one).

    `record` is called after every successful prediction with the serving model's info, its
    outputs and the inputs it ran on, and returns one id per row (None: this model's
    predictions are not tracked); the sink may keep inputs (a signed collection policy) with
    their ids, so a label sent later can join its row.
    `submit` matches `(prediction_id, label)` pairs and returns the outcome counts (`matched`,
    `unknown`, `expired`, `duplicate`, `invalid`); it never raises for bad items.
    """

    def record(self, model: dict[str, Any], outputs: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray] | None = None) -> list[str] | None: ...

    def submit(self, items: list[tuple[object, object]]) -> dict[str, int]: ...


# A client that just closed may still hold its slot until the server sees the close (its
# thread, the poller or the batching loop): a connection over `max_connections` waits this
# long for a slot before it is answered `busy`, so a close-then-reconnect is not refused.
SLOT_WAIT_S = 0.25


@dataclass(frozen=True)
class ApiLimits:
    """Bounds on what one request may cost the device."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_batch: int = 4096
    max_connections: int = 64
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_header_bytes, self.max_batch, self.max_connections) < 1:
            raise ValueError("API limits must be positive")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")


def status_for(exc: BaseException) -> tuple[int, str]:
    """HTTP-style status and a short error code for an exception raised while serving."""
    if isinstance(exc, RequestTooLargeError):
        return 413, "too_large"
    if isinstance(exc, FeedbackDisabledError):
        return 404, "feedback_disabled"
    if isinstance(exc, InputValidationError):
        return 400, "invalid_input"
    if isinstance(exc, MessageError):
        return 400, "bad_request"
    if isinstance(exc, NoModelLoadedError):
        return 503, "no_model"
    if isinstance(exc, RuntimeFailure):
        return 500, "runtime_failure"
    return 500, "internal"


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and the JSON error document for `exc`; unexpected errors are logged, not echoed."""
    status, code = status_for(exc)
    message = str(exc) if isinstance(exc, EdgefleetError) else "internal error"
    if status >= 500:
        log_event(_log, "inference.error", level=logging.ERROR, code=code, error=repr(exc))
    return status, {"error": {"code": code, "message": message}}


_OFFERS: dict[tuple[type, str], bool] = {}


def _offers(obj: object, method: str) -> bool:
    """Whether `obj`'s class has `method`, remembered per class: `getattr` of a missing
    attribute raises and catches an AttributeError, a microsecond on every request."""
    key = (type(obj), method)
    got = _OFFERS.get(key)
    if got is None:
        got = _OFFERS[key] = callable(getattr(type(obj), method, None))
    return got


class InferenceService:
    """Decode, bound, predict, encode: the part of a request both transports share."""

    def __init__(
        self, predictor: Predictor, limits: ApiLimits | None = None, feedback: FeedbackSink | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.predictor = predictor
        self.limits = limits or ApiLimits()
        self.feedback = feedback
        self.metrics = metrics  # the agent's Prometheus exposition (HTTP `GET /metrics`), when wired

    def check_body_size(self, size: int) -> None:
        """Raises `RequestTooLargeError` if a body of `size` bytes is over the limit."""
        if size > self.limits.max_body_bytes:
            raise RequestTooLargeError(
                f"request body is {size} bytes, the limit is {self.limits.max_body_bytes}"
            )

    def _check_batch(self, name: str, rows: int) -> None:
        if rows > self.limits.max_batch:
            raise RequestTooLargeError(
                f"input {name!r} has a batch of {rows} rows, the limit is {self.limits.max_batch}"
            )

    def predict(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Run the predictor after the batch limit; returns outputs and `{name, version}`.

        Raises `RequestTooLargeError`, `InputValidationError`, `NoModelLoadedError`, `RuntimeFailure`.
        """
        outputs, model, _ = self.predict_ids(inputs)
        return outputs, model

    def predict_ids(
        self, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str] | None]:
        """`predict` plus one prediction id per row (None without a feedback sink or when the
        model's predictions are not tracked). Raises as `predict`."""
        self.check_rows(inputs)
        return self.run_on(self.target(), inputs)

    def check_rows(self, inputs: dict[str, np.ndarray]) -> None:
        """Raises `RequestTooLargeError` if an input has more rows than `max_batch`."""
        for name, arr in inputs.items():
            if arr.ndim:
                self._check_batch(name, arr.shape[0])

    def target(self) -> Predictor:
        """The model one request (or one micro-batch) runs on: a swappable holder's `snapshot()`,
        else the predictor itself. Raises `NoModelLoadedError` when nothing is served."""
        if _offers(self.predictor, "snapshot"):  # a swappable holder pins one model
            return self.predictor.snapshot()  # type: ignore[attr-defined]
        return self.predictor

    def run_on(
        self, target: Predictor, inputs: dict[str, np.ndarray], calls: int = 1
    ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str] | None]:
        """Run `target` (from `target()`) on checked inputs, then record prediction ids.

        `calls` > 1: the inputs are that many requests concatenated on axis 0 (micro-batching);
        a predictor offering `predict_batched(inputs, calls)` is told so (its telemetry then
        counts the requests, not the batch). A predictor offering `predict_served(inputs,
        calls, ids)` returns its outputs with the info of the model that made them (the
        daemon's: a swap between the run and a later `info()` would report the wrong model)
        and, when this service has a feedback sink, the prediction ids: such a predictor is its
        own sink's source (the daemon hands both the same telemetry tap). Raises as `predict`.
        """
        if _offers(target, "predict_served"):  # the info of the model that ran, and its ids
            outputs, info, ids = target.predict_served(  # type: ignore[attr-defined]
                inputs, calls, self.feedback is not None)
        else:
            batched = getattr(target, "predict_batched", None) if calls > 1 else None
            outputs = batched(inputs, calls) if batched is not None else target.predict(inputs)
            info = target.info()
            ids = self.feedback.record(info, outputs, inputs) if self.feedback is not None else None
        return outputs, {"name": str(info.get("name", "")), "version": str(info.get("version", ""))}, ids

    def submit_feedback(self, labels: Any) -> dict[str, int]:
        """Match a batch of labels: `labels` is a list of `{"prediction_id": str, "label": number}`.

        Raises `MessageError` (400) when the batch is not such a list, `RequestTooLargeError`
        (413) over `max_batch` items, `FeedbackDisabledError` (404) when this service has no sink.
        Unknown, expired, duplicate ids and unusable labels are counted, not refused.
        """
        if self.feedback is None:
            raise FeedbackDisabledError("this agent does not track predictions (no feedback sink)")
        if not isinstance(labels, list):
            raise MessageError('feedback must be {"labels": [{"prediction_id": "...", "label": 1}, ...]}')
        if len(labels) > self.limits.max_batch:
            raise RequestTooLargeError(
                f"{len(labels)} labels in one call, the limit is {self.limits.max_batch}"
            )
        items: list[tuple[object, object]] = []
        for i, item in enumerate(labels):
            if not isinstance(item, dict) or "prediction_id" not in item or "label" not in item:
                raise MessageError(f'feedback item {i}: expected {{"prediction_id": "...", "label": ...}}')
            items.append((item["prediction_id"], item["label"]))
        return self.feedback.submit(items)

    def decode_feedback_json(self, body: bytes) -> Any:
        """The `labels` list of a JSON feedback body. Raises `MessageError`."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or "labels" not in doc:
            raise MessageError(
                'body must be a JSON object {"labels": [{"prediction_id": "...", "label": 1}]}'
            )
        return doc["labels"]

    def model_info(self) -> dict[str, Any]:
        """The served model's info. Raises `NoModelLoadedError` if there is none."""
        return self.predictor.info()

    def health(self) -> dict[str, Any]:
        """Liveness plus whether a model is ready (never raises)."""
        try:
            info = self.predictor.info()
        except EdgefleetError:
            return {"status": "ok", "ready": False, "model": None}
        return {
            "status": "ok",
            "ready": True,
            "model": {"name": info.get("name"), "version": info.get("version")},
        }

    # --- JSON ----------------------------------------------------------------------------
    def decode_json(self, body: bytes) -> dict[str, np.ndarray]:
        """`{"inputs": {name: nested lists}}` to arrays. Raises `MessageError`/`InputValidationError`."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
            raise MessageError('body must be a JSON object {"inputs": {"<name>": [[...], ...]}}')
        arrays: dict[str, np.ndarray] = {}
        for name, value in doc["inputs"].items():
            if isinstance(value, list):
                self._check_batch(name, len(value))
            try:
                arrays[name] = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise InputValidationError(
                    f"input {name!r}: not a rectangular numeric array ({exc})"
                ) from None
        return arrays

    @staticmethod
    def encode_json(
        outputs: Mapping[str, np.ndarray], model: dict[str, str], ids: list[str] | None = None
    ) -> bytes:
        """The JSON response `{"outputs": {...}, "model": {name, version}}`, plus
        `"prediction_ids": [...]` (one per row) when predictions are tracked."""
        doc: dict[str, Any] = {"outputs": {k: v.tolist() for k, v in outputs.items()}, "model": model}
        if ids is not None:
            doc["prediction_ids"] = ids
        return json.dumps(doc, separators=(",", ":")).encode()

    # --- npy -----------------------------------------------------------------------------
    def single_input_name(self) -> str:
        """The only input's name. Raises `MessageError` for multi-input models, `NoModelLoadedError`."""
        inputs = self.predictor.info().get("inputs", [])
        if len(inputs) != 1:
            raise MessageError(
                f"an application/x-npy body needs a single-input model; this one has {len(inputs)}: use JSON"
            )
        return str(inputs[0]["name"])

    @staticmethod
    def decode_npy(body: bytes) -> np.ndarray:
        """One `.npy` array (no pickles). Raises `MessageError` if the body is not one."""
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise MessageError(f"body is not a valid .npy array: {exc}") from None
        if not isinstance(arr, np.ndarray):
            raise MessageError("body must be a single .npy array, not an archive")
        return arr

    @staticmethod
    def encode_npy(outputs: Mapping[str, np.ndarray]) -> tuple[bytes, str]:
        """One output as `.npy`, several as `.npz`; returns (body, content type)."""
        buf = io.BytesIO()
        if len(outputs) == 1:
            np.save(buf, next(iter(outputs.values())), allow_pickle=False)
            return buf.getvalue(), "application/x-npy"
        np.savez(buf, **dict(outputs))  # type: ignore[arg-type]
        return buf.getvalue(), "application/x-npz"

"""The runtime interface, request validation, and the `LoadedModel` the rest of the agent uses.

A runtime only loads and runs a model file; everything that comes from outside (an
inference request, a golden vector, a scored file) goes through `validate_inputs` first, so
a bad request is refused with a message naming the input and what was expected instead of
surfacing as an opaque runtime error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.contract.manifest import Manifest, TensorSpec
from agent.errors import InputValidationError, RuntimeFailure

# Kinds numpy may produce from JSON or files that can be cast to a model's dtype without
# changing meaning: bool/int/float only; strings, objects, complex are always refused.
_NUMERIC_KINDS = frozenset("biuf")


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded model behind one inference engine (onnxruntime, LiteRT, ...)."""

    @property
    def input_names(self) -> list[str]:
        """Model input names in the model's order."""
        ...

    @property
    def output_names(self) -> list[str]:
        """Model output names in the model's order."""
        ...

    def load(self, model_path: Path, manifest: Manifest) -> None:
        """Load and warm the model. Raises `RuntimeFailure` if it cannot be loaded or warmed."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated inputs. Raises `RuntimeFailure` if the engine fails."""
        ...

    def close(self) -> None:
        """Release the engine's resources (idempotent)."""
        ...


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _to_array(spec: TensorSpec, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputValidationError(
                f"input {spec.name!r}: not a rectangular numeric array ({exc})"
            ) from None
    target = np.dtype(spec.dtype)
    if arr.dtype == target:
        return arr
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InputValidationError(
            f"input {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype} "
            "(only numbers and booleans are accepted)"
        )
    if not np.can_cast(arr.dtype, target, casting="same_kind"):
        raise InputValidationError(
            f"input {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype} (would lose information)"
        )
    if target.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        info = np.iinfo(target)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise InputValidationError(
                f"input {spec.name!r}: values [{lo}, {hi}] do not fit dtype {spec.dtype}"
            )
    return arr.astype(target)


def validate_inputs(manifest: Manifest, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert and check request inputs against `manifest.inputs`.

    Names must match exactly; values are cast only when safe (float64 -> float32, int -> float,
    int64 -> int32 within range); rank and every fixed dimension must match, and all inputs must
    share the batch size on axis 0. Returns C-contiguous arrays keyed by input name.
    Raises `InputValidationError` saying which input is wrong and what was expected.
    """
    if not isinstance(inputs, Mapping):
        raise InputValidationError("inputs must be an object mapping input names to arrays")
    expected = {spec.name for spec in manifest.inputs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        raise InputValidationError(f"{'; '.join(parts)}; the model expects {sorted(expected)}")
    out: dict[str, np.ndarray] = {}
    batch: tuple[str, int] | None = None
    for spec in manifest.inputs:
        arr = _to_array(spec, inputs[spec.name])
        if arr.ndim != len(spec.shape):
            hint = (
                " (wrap a single example in a list to make a batch of 1)"
                if arr.ndim + 1 == len(spec.shape)
                else ""
            )
            raise InputValidationError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} with shape {_fmt_shape(spec.shape)}, "
                f"got rank {arr.ndim} with shape {_fmt_shape(arr.shape)}{hint}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if want is not None and want != got:
                raise InputValidationError(
                    f"input {spec.name!r}: expected shape {_fmt_shape(spec.shape)}, got "
                    f"{_fmt_shape(arr.shape)} (axis {axis} is {got}, expected {want})"
                )
        if arr.ndim and spec.shape[0] is None:
            if arr.shape[0] == 0:
                raise InputValidationError(f"input {spec.name!r}: empty batch (axis 0 is 0)")
            if batch is not None and batch[1] != arr.shape[0]:
                raise InputValidationError(
                    f"inputs {batch[0]!r} and {spec.name!r} have different batch sizes "
                    f"({batch[1]} vs {arr.shape[0]})"
                )
            batch = (spec.name, arr.shape[0])
        out[spec.name] = np.ascontiguousarray(arr)
    return out


_LAYOUT_CACHE_MAX = 256


def _layout_key(inputs: Mapping[str, Any]) -> tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] | None:
    """What `validate_inputs` looks at, or None when a value is not a C-contiguous ndarray
    (lists, strided views: those always take the full check)."""
    if type(inputs) is not dict:
        return None
    key = []
    for name, arr in inputs.items():
        if type(arr) is not np.ndarray or not arr.flags.c_contiguous:
            return None
        key.append((name, arr.dtype, arr.shape))
    return tuple(key)


class LoadedModel:
    """A runtime plus its manifest: the object slots, the inference API and the CLI hold.

    `predict` validates before running, so callers never hand unchecked data to an engine.
    It is safe to call from several threads (each runtime guarantees that).
    """

    def __init__(self, runtime: ModelRuntime, manifest: Manifest, model_path: Path) -> None:
        self.runtime = runtime
        self.manifest = manifest
        self.model_path = model_path
        self._info = {
            "name": manifest.name,
            "version": manifest.version,
            "runtime": manifest.runtime,
            "inputs": [spec.model_dump(mode="json") for spec in manifest.inputs],
            "outputs": [spec.model_dump(mode="json") for spec in manifest.outputs],
        }
        # Layouts (names, dtypes, shapes) `validate_inputs` already accepted unchanged: the same
        # layout again needs no check (the verdict depends on nothing else), which is most of
        # the Python cost of a small request. Bounded; a plain set read is GIL-atomic.
        self._valid_layouts: set[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]] = set()

    @property
    def name(self) -> str:
        """The model's name from the manifest."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The model's version from the manifest."""
        return self.manifest.version

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate `inputs` and run the model.

        Raises `InputValidationError` for a bad request, `RuntimeFailure` if the engine fails.
        """
        key = _layout_key(inputs)
        if key is not None and key in self._valid_layouts:
            return self.runtime.run(inputs)
        checked = validate_inputs(self.manifest, inputs)
        if key is not None and all(checked[name] is inputs[name] for name in checked):
            if len(self._valid_layouts) >= _LAYOUT_CACHE_MAX:
                self._valid_layouts.clear()
            self._valid_layouts.add(key)
        return self.runtime.run(checked)

    def info(self) -> dict[str, Any]:
        """Name, version, runtime and the input/output schema (a shallow copy; called per request)."""
        return dict(self._info)

    def close(self) -> None:
        """Release the runtime."""
        self.runtime.close()


def check_model_names(kind: str, model_names: Sequence[str], specs: Sequence[TensorSpec]) -> None:
    """Refuse a model whose input/output names differ from its manifest. Raises `RuntimeFailure`."""
    declared = [spec.name for spec in specs]
    if sorted(model_names) != sorted(declared):
        raise RuntimeFailure(f"model {kind} {list(model_names)} do not match the manifest's {declared}")


def warmup_inputs(manifest: Manifest) -> dict[str, np.ndarray]:
    """Zero inputs of batch 1 (dynamic axes set to 1) used to warm a freshly loaded model."""
    return {
        spec.name: np.zeros([1 if d is None else d for d in spec.shape], dtype=np.dtype(spec.dtype))
        for spec in manifest.inputs
    }

"""LiteRT (TFLite) behind `ModelRuntime`.

Uses `ai_edge_litert`; `tflite_runtime` only when ai-edge-litert is not installed (the old
wheel imports under numpy 2 but fails at `Interpreter()`). A LiteRT `Interpreter` is not
thread-safe and its tensors are resized per batch size, so `run` holds a lock around
resize/set/invoke/get; for the small models on a gateway that costs far less than a second
interpreter's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.manifest import Manifest
from agent.errors import RuntimeFailure
from agent.runtimes.base import check_model_names, warmup_inputs


def interpreter_class() -> Any:
    """The LiteRT `Interpreter` class. Raises `RuntimeFailure` if no TFLite runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeFailure("no TFLite runtime installed (pip install ai-edge-litert)") from exc
    return Interpreter


class LiteRtRuntime:
    """One LiteRT interpreter for one model file, serialized by a lock."""

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads
        self._interp: Any = None
        self._lock = threading.Lock()
        self._in: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._out: list[tuple[str, int]] = []

    @property
    def input_names(self) -> list[str]:
        """Model input names."""
        return list(self._in)

    @property
    def output_names(self) -> list[str]:
        """Model output names."""
        return [name for name, _ in self._out]

    def load(self, model_path: Path, manifest: Manifest) -> None:
        """Create the interpreter, check names/dtypes against the manifest and warm it.

        Raises `RuntimeFailure` if the file is not a loadable TFLite model or disagrees with the manifest.
        """
        cls = interpreter_class()
        try:
            interp = cls(model_path=str(model_path), num_threads=self.threads)
            interp.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError from C++
            raise RuntimeFailure(f"LiteRT could not load {model_path.name}: {exc}") from exc
        ins = interp.get_input_details()
        outs = interp.get_output_details()
        check_model_names("inputs", [d["name"] for d in ins], manifest.inputs)
        check_model_names("outputs", [d["name"] for d in outs], manifest.outputs)
        dtypes = {d["name"]: np.dtype(d["dtype"]).name for d in ins}
        for spec in manifest.inputs:
            if dtypes[spec.name] != spec.dtype:
                raise RuntimeFailure(
                    f"model input {spec.name!r} has dtype {dtypes[spec.name]}, manifest says {spec.dtype}"
                )
        self._interp = interp
        self._in = {d["name"]: (int(d["index"]), tuple(int(x) for x in d["shape"])) for d in ins}
        self._out = [(d["name"], int(d["index"])) for d in outs]
        self.run(warmup_inputs(manifest))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Resize for the batch if needed, invoke, copy outputs. Raises `RuntimeFailure` on failure."""
        with self._lock:
            interp = self._interp
            if interp is None:
                raise RuntimeFailure("LiteRT runtime used before load() or after close()")
            try:
                resized = False
                for name, (index, shape) in self._in.items():
                    arr = inputs[name]
                    if arr.shape != shape:
                        interp.resize_tensor_input(index, list(arr.shape))
                        self._in[name] = (index, arr.shape)
                        resized = True
                if resized:
                    interp.allocate_tensors()
                for name, (index, _) in self._in.items():
                    interp.set_tensor(index, inputs[name])
                interp.invoke()
                return {name: interp.get_tensor(index) for name, index in self._out}
            except (ValueError, RuntimeError) as exc:
                raise RuntimeFailure(f"LiteRT run failed: {exc}") from exc

    def close(self) -> None:
        """Drop the interpreter."""
        with self._lock:
            self._interp = None

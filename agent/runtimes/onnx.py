"""onnxruntime behind `ModelRuntime`: one CPU `InferenceSession`, warmed once at load.

`InferenceSession.run` is thread-safe, so one session serves every request thread; intra-op
threads default to 1 because edge requests are small and the cores are shared with the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.manifest import Manifest
from agent.errors import RuntimeFailure
from agent.runtimes.base import check_model_names, warmup_inputs

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class OnnxRuntime:
    """An onnxruntime CPU session for one model file."""

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads
        self._session: Any = None
        self._run: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    @property
    def input_names(self) -> list[str]:
        """Model input names."""
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        """Model output names."""
        return list(self._outputs)

    def load(self, model_path: Path, manifest: Manifest) -> None:
        """Create the session, check names/dtypes against the manifest and warm it.

        Raises `RuntimeFailure` if the file is not a loadable ONNX model or disagrees with the manifest.
        """
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RuntimeFailure(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        inputs = {i.name: i.type for i in session.get_inputs()}
        check_model_names("inputs", list(inputs), manifest.inputs)
        check_model_names("outputs", [o.name for o in session.get_outputs()], manifest.outputs)
        for spec in manifest.inputs:
            if _ORT_TYPES.get(inputs[spec.name]) != spec.dtype:
                raise RuntimeFailure(
                    f"model input {spec.name!r} has type {inputs[spec.name]}, manifest says {spec.dtype}"
                )
        self._session = session
        self._inputs = list(inputs)
        self._outputs = [o.name for o in session.get_outputs()]
        # The binding under `InferenceSession.run`: the wrapper re-checks, on every call, input
        # names (already checked against the manifest at load and by `validate_inputs` per
        # request), OrtValue ownership (we feed numpy arrays only) and WebGPU graph capture (CPU
        # only): a third of a batch-1 run of a small model. Any engine error still raises.
        inner = getattr(session, "_sess", None)
        self._run = inner.run if inner is not None and hasattr(inner, "run") else None
        self.run(warmup_inputs(manifest))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session. Raises `RuntimeFailure` if not loaded or onnxruntime fails."""
        session = self._session
        if session is None:
            raise RuntimeFailure("onnx runtime used before load() or after close()")
        feed = inputs if type(inputs) is dict else dict(inputs)
        try:
            if self._run is not None:
                results = self._run(self._outputs, feed, None)
            else:  # an onnxruntime without the binding attribute: the public wrapper
                results = session.run(self._outputs, feed)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime run failed: {exc}") from exc
        if len(results) == 1:
            return {self._outputs[0]: results[0]}
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        """Drop the session."""
        self._session = self._run = None

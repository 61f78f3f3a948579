"""The local API's `Predictor` over the lifecycle's holder: what the daemon serves.

Why an adapter: the lifecycle swaps models in `agent.serving.model_holder.ModelHolder`, the
servers want `predict` and `info` (`agent.serving.api.Predictor`), and telemetry wants every
served request folded into the sketch of the bundle that served it (`TelemetryTap`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.errors import EdgefleetError, InputValidationError, NoModelLoadedError
from agent.serving.model_holder import ModelHolder


class ServedModel:
    """`Predictor` for the local API: the lifecycle holder's model, with telemetry.

    The API's servers call `predict_served`, which reports the bundle that actually served the
    request (the holder tags it): reading the holder's current bundle before or after the run
    instead would credit a request to the wrong bundle when a swap lands in between, and cost
    a lock each time. Its info is built once per bundle and shared, read-only.
    """

    def __init__(self, holder: ModelHolder, catalog: ModelCatalog, tap: TelemetryTap | None) -> None:
        self.holder = holder
        self.catalog = catalog
        self.tap = tap
        self._served_infos: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raises `NoModelLoadedError`, `InputValidationError`, `RuntimeFailure`."""
        return self.predict_served(inputs, 1)[0]

    def predict_batched(self, inputs: dict[str, np.ndarray], calls: int) -> dict[str, np.ndarray]:
        """`predict` of `calls` requests stacked on axis 0 by the Unix server's micro-batching:
        telemetry counts `calls` requests (each with the batch's latency). Raises as `predict`."""
        return self.predict_served(inputs, calls)[0]

    def predict_served(self, inputs: dict[str, np.ndarray], calls: int = 1, ids: bool = False
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str] | None]:
        """Outputs, the info of the bundle that served them (`info()`'s fields, shared by every
        request of that bundle: read it, do not change it) and, with `ids`, one prediction id
        per row from the tap (None: not tracked), issued in the same step as the telemetry.
        Raises as `predict`."""
        tap = self.tap
        t0 = time.perf_counter()
        try:
            bid, out = self.holder.predict_tagged(inputs)
        except NoModelLoadedError as exc:
            raise NoModelLoadedError("no verified model is installed yet") from exc
        except InputValidationError:
            if tap is not None and (bid := self.holder.bundle_id or ""):
                tap.rejected(bid)
            raise
        except EdgefleetError:
            if tap is not None and (bid := self.holder.bundle_id or ""):
                tap.fold(bid, inputs, None, time.perf_counter() - t0, True)
            raise
        issued = None
        if tap is not None:
            if ids:
                issued = tap.served(bid, inputs, out, time.perf_counter() - t0, calls)
            else:
                tap.fold(bid, inputs, out, time.perf_counter() - t0, False, calls)
        return out, self._served_info(bid), issued

    def _served_info(self, bid: str) -> dict[str, Any]:
        base = self.catalog.infos.get(bid)
        if base is None:
            raise NoModelLoadedError("no verified model is installed yet")
        known = self._served_infos.get(bid)
        if known is None or known[0] is not base:  # a bundle loaded again gets a fresh entry
            if len(self._served_infos) >= 64:
                self._served_infos.clear()
            known = self._served_infos[bid] = (base, {**base, "bundle_id": bid})
        return known[1]

    def info(self) -> dict[str, Any]:
        """The served model's info (name, version, inputs, outputs) plus its bundle id."""
        bid = self.holder.bundle_id
        info = self.catalog.infos.get(bid or "")
        if bid is None or info is None:
            raise NoModelLoadedError("no verified model is installed yet")
        return {**info, "bundle_id": bid}

"""The read side of the telemetry store: merged windows, drift, quantiles, paging and listing.

Why a module of its own: ingest (decode, check, claim, merge at flush: fleet/telemetry/ingest.py)
is the hot path of an ingest worker and changes for throughput; these queries serve the API, the
drift monitor and the rollout gates and change with them. `WindowQueries` is a base of
`TelemetryStore`: every query flushes first (so a reader sees what this process ingested) and
reads through the store's database and lock.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import numpy as np
from datasketches import kll_floats_sketch

from agent.contract.telemetry import TelemetryReport, latency_bucket_upper, merge_reports
from agent.contract.telemetry_codec import decode_report
from agent.errors import MessageError
from fleet.db.database import Database
from fleet.errors import FleetInputError
from fleet.telemetry import serving
from fleet.telemetry.alert_rules import ServingSample
from fleet.telemetry.device_totals import DeviceTotalsTable, DeviceVersionTotals
from fleet.telemetry.drift import DriftReport, DriftThresholds, Method, report_drift

WINDOWS_TABLE = "telemetry_windows"
KLL_K = 200


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """Quantile (upper bucket bound, seconds) of a merged latency histogram; NaN when empty."""
    total = int(counts.sum())
    if total == 0:
        return math.nan
    i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return latency_bucket_upper(min(i, counts.size - 1))


class WindowQueries:
    """Queries over the stored windows; the store provides `flush`, `database`, `_lock`,
    `_profiles` and `_device_totals`."""

    database: Database
    _lock: threading.RLock
    _device_totals: DeviceTotalsTable
    _profiles: Any  # ProfileLookup | None (fleet/telemetry/ingest.py)

    def flush(self) -> int:
        raise NotImplementedError

    def windows(
        self, model: str, version: str, cohort: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> list[dict[str, object]]:
        """Stored windows in time order (flushes first): each a dict with `window_start`,
        `cohort`, `report` (decoded merged report), `reports`, `devices`, `device_count`."""
        self.flush()
        sql = f"SELECT * FROM {WINDOWS_TABLE} WHERE model = :model AND version = :version"  # noqa: S608
        args: dict[str, object] = {"model": model, "version": version, "cohort": cohort,
                                   "since": since, "until": until}
        if cohort is not None:
            sql += " AND cohort = :cohort"
        if since is not None:
            sql += " AND window_start >= :since"
        if until is not None:
            sql += " AND window_start < :until"
        with self._lock, self.database.read() as db:
            rows = db.query(sql + " ORDER BY window_start, cohort",
                            {k: v for k, v in args.items() if v is not None})
        return [{
            "window_start": r["window_start"], "cohort": r["cohort"], "reports": r["reports"],
            "report": decode_report(r["payload"], max_bytes=2**31),
            "devices": json.loads(r["devices"]), "device_count": r["device_count"],
            "latency_kll": r["latency_kll"],
        } for r in rows]

    def query_windows(
        self, model: str, version: str, cohort: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> TelemetryReport | None:
        """The merged sketch of every matching window (all cohorts when `cohort` is None), or
        None when there is none. Raises `FleetInputError` if stored windows cannot merge."""
        merged: TelemetryReport | None = None
        for w in self.windows(model, version, cohort, since, until):
            rep = w["report"]
            assert isinstance(rep, TelemetryReport)
            try:
                merged = rep if merged is None else merge_reports(merged, rep)
            except MessageError as exc:
                raise FleetInputError(f"stored windows of {model} {version} do not merge: {exc}") from None
        return merged

    def device_totals(self, model: str, version: str, since: float | None = None
                      ) -> list[DeviceVersionTotals]:
        """Per-device sums of a version since `since` (flushes first): experiments judge by device."""
        self.flush()
        with self._lock, self.database.read() as db:
            return self._device_totals.query(db, model, version, since)

    def serving_totals(self, updated_since: float, limit: int) -> list[serving.ServingTotals]:
        """Serving figures per (model, version, cohort) since the store began, of the `limit`
        keys written most recently at or after `updated_since` (flushes first; /metrics)."""
        self.flush()
        with self._lock, self.database.read() as db:
            return serving.totals(db, updated_since, limit)

    def serving_samples(self, since: float, until: float) -> dict[tuple[str, str], list[ServingSample]]:
        """(model, cohort) -> per-version serving figures of the windows starting in [since,
        until) (flushes first; the health watch's regression rules)."""
        self.flush()
        with self._lock, self.database.read() as db:
            return serving.samples(db, since, until)

    def drift(
        self, model: str, version: str, cohort: str | None = None,
        since: float | None = None, until: float | None = None,
        thresholds: DriftThresholds | None = None, method: Method = "auto",
    ) -> DriftReport | None:
        """Drift of the merged windows against the version's reference profile (None when
        there is no data or no profile lookup knows the version). For rollout gates,
        `drifted_share` is the drift score in [0, 1]."""
        profile = self._profiles(model, version) if self._profiles else None
        merged = self.query_windows(model, version, cohort, since, until)
        if profile is None or merged is None:
            return None
        try:
            return report_drift(profile, merged, thresholds, method)
        except FleetInputError:
            return None

    def device_latency_quantiles(
        self, model: str, version: str, quantiles: list[float], cohort: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> list[float]:
        """Quantiles across reports of the per-report mean latency (seconds), from the merged
        KLL sketches; NaN when no report had requests."""
        kll = kll_floats_sketch(KLL_K)
        for w in self.windows(model, version, cohort, since, until):
            blob = w["latency_kll"]
            assert isinstance(blob, bytes)
            kll.merge(kll_floats_sketch.deserialize(blob))
        if kll.is_empty():
            return [math.nan] * len(quantiles)
        return [float(kll.get_quantile(q)) for q in quantiles]

    # -- listing (the fleet API and the periodic drift evaluator) -----------------------
    def window_keys(self, updated_since: float | None = None) -> list[tuple[str, str, str]]:
        """(model, version, cohort) of every stored window written at or after `updated_since`
        (all when None), flushing first: what a periodic evaluator has to look at."""
        self.flush()
        sql = f"SELECT DISTINCT model, version, cohort FROM {WINDOWS_TABLE}"  # noqa: S608 - constant name
        args: dict[str, object] = {}
        if updated_since is not None:
            sql, args = sql + " WHERE updated_at >= :since", {"since": updated_since}
        with self._lock, self.database.read() as db:
            return [(r[0], r[1], r[2]) for r in db.execute(sql + " ORDER BY 1, 2, 3", args)]

    def window_page(
        self, model: str | None = None, version: str | None = None, cohort: str | None = None,
        since: float | None = None, until: float | None = None,
        after: tuple[float, str, str, str] | None = None, limit: int = 100,
    ) -> list[dict[str, object]]:
        """One page of stored windows ordered by (window_start, model, version, cohort), each
        like `windows()` plus `model`, `version` and `updated_at`; `after` is the last key of
        the previous page. Keyset pagination, so a page costs `limit` decodes at most."""
        self.flush()
        where: list[str] = ["1 = 1"]
        args: dict[str, object] = {"limit": max(1, int(limit))}
        for column, value in (("model", model), ("version", version), ("cohort", cohort)):
            if value is not None:
                where, args[column] = [*where, f"{column} = :{column}"], value
        if since is not None:
            where, args["since"] = [*where, "window_start >= :since"], since
        if until is not None:
            where, args["until"] = [*where, "window_start < :until"], until
        if after is not None:
            where = [*where, "(window_start, model, version, cohort) "
                             "> (:a_start, :a_model, :a_version, :a_cohort)"]
            args.update(zip(("a_start", "a_model", "a_version", "a_cohort"), after, strict=True))
        sql = (f"SELECT * FROM {WINDOWS_TABLE} WHERE {' AND '.join(where)} "  # noqa: S608 - fixed fragments
               "ORDER BY window_start, model, version, cohort LIMIT :limit")
        with self._lock, self.database.read() as db:
            rows = db.query(sql, args)
        return [{
            "model": r["model"], "version": r["version"], "cohort": r["cohort"],
            "window_start": r["window_start"], "updated_at": r["updated_at"], "reports": r["reports"],
            "report": decode_report(r["payload"], max_bytes=2**31),
            "devices": json.loads(r["devices"]), "device_count": r["device_count"],
        } for r in rows]

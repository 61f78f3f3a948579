"""Health checks for a freshly activated model: golden vectors, probation, watchdog.

Why: a bundle can verify perfectly and still be wrong for this device (a bad export, a
runtime that mis-executes an op, a model that is too slow or too big here). Golden
vectors catch wrong numbers before a request is served; probation watches real requests
(p95 latency vs the manifest's budget, error rate, resident memory) before the update is
committed; the watchdog turns a hang into a failure instead of a wedged device.

Watchdog limit: a native thread stuck inside a runtime cannot be killed from Python. Risky
calls (first load, warm-up, golden vectors) run in a daemon worker thread with a deadline;
on expiry we report `InferenceTimeoutError`, abandon the thread (counted in
`hung_threads()`) and roll back. If the hang also holds the GIL, nothing in-process runs:
the systemd watchdog (`WatchdogSec`, fed by the daemon's loop) kills the process, and on
restart the state record (saved before activation) resumes into `crash_recovered`, which
the lifecycle table turns into a rollback (probation) or a bounded retry (activation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from agent.contract.manifest import HealthPolicy, Manifest
from agent.errors import InferenceTimeoutError, RuntimeFailure
from agent.logs import log_event

log = logging.getLogger(__name__)
T = TypeVar("T")
_hung = 0
_hung_lock = threading.Lock()


class Predictor(Protocol):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def hung_threads() -> int:
    """Worker threads abandoned after a deadline (a restart reclaims them)."""
    return _hung


def run_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread; return its result or re-raise its exception.

    Raises `InferenceTimeoutError` if it has not finished after `timeout_s` (the thread is
    abandoned, see the module docstring).
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=work, name=f"watchdog-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        global _hung
        with _hung_lock:
            _hung += 1
        log_event(log, "health.hang", logging.ERROR, what=what, timeout_s=timeout_s)
        raise InferenceTimeoutError(f"{what} did not finish within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


@dataclass(frozen=True)
class GoldenResult:
    """Outcome of the golden vectors: ok, how far the worst value was, and why not ok."""

    ok: bool
    vectors: int
    max_abs_dev: float
    label_agreement: float | None
    reason: str = ""

    def measurements(self) -> dict[str, float]:
        m = {"golden_vectors": float(self.vectors), "golden_max_abs_dev": self.max_abs_dev}
        if self.label_agreement is not None:
            m["golden_label_agreement"] = self.label_agreement
        return m


def check_golden(model: Predictor, manifest: Manifest) -> GoldenResult:
    """Run the manifest's golden inputs and compare with the expected outputs.

    Passing means every expected output is within `rtol`/`atol` (`np.allclose`); when
    `label_agreement_min` is set (quantized models), argmax agreement at or above it passes
    instead. No golden vectors is a pass with `vectors=0`. Raises whatever `predict`
    raises (`RuntimeFailure`, `InputValidationError`): the caller treats it as a failure.
    """
    golden = manifest.golden
    if not golden.inputs:
        return GoldenResult(True, 0, 0.0, None, "no golden vectors")
    dtypes = {spec.name: np.dtype(spec.dtype) for spec in manifest.inputs}
    inputs = {name: np.asarray(v, dtype=dtypes.get(name, np.float32)) for name, v in golden.inputs.items()}
    vectors = int(next(iter(inputs.values())).shape[0]) if inputs else 0
    out = model.predict(inputs)
    max_dev = 0.0
    within = True
    agree = total = 0
    problems: list[str] = []
    for name, expected_list in golden.expected.items():
        if name not in out:
            return GoldenResult(False, vectors, float("inf"), None, f"model has no output {name!r}")
        got = np.asarray(out[name], dtype=np.float64)
        exp = np.asarray(expected_list, dtype=np.float64)
        if got.shape != exp.shape:
            return GoldenResult(False, vectors, float("inf"), None,
                                f"output {name!r} shape {got.shape} != expected {exp.shape}")
        dev = float(np.max(np.abs(got - exp))) if got.size else 0.0
        max_dev = max(max_dev, dev if np.isfinite(dev) else float("inf"))
        if not np.allclose(got, exp, rtol=golden.rtol, atol=golden.atol):
            within = False
            problems.append(
                f"{name}: max abs deviation {dev:.3g} outside rtol={golden.rtol} atol={golden.atol}"
            )
        if got.ndim >= 2 and got.shape[-1] > 1:
            agree += int((got.argmax(-1) == exp.argmax(-1)).sum())
            total += int(np.prod(got.shape[:-1]))
    agreement = agree / total if total else None
    if golden.label_agreement_min is not None:
        ok = agreement is not None and agreement >= golden.label_agreement_min
        reason = "" if ok else f"label agreement {agreement} below {golden.label_agreement_min}"
    else:
        ok = within
        reason = "; ".join(problems)
    return GoldenResult(ok, vectors, max_dev, agreement, reason)


def current_rss_mb() -> float:
    """Resident memory of this process in MB (Linux `/proc`; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass(frozen=True)
class Verdict:
    """Probation's decision with the reason and what was measured."""

    ok: bool
    reason: str
    measurements: dict[str, float] = field(default_factory=dict)


class Probation:
    """Watches served requests after activation; decides commit or rollback.

    The window closes when at least `probation_requests` requests were seen *and*
    `probation_seconds` passed *and* the policy's evidence is there (`min_successful_requests`
    answered requests, unless `traffic` is "none"); if traffic is too thin, `max_wait_s` closes
    it anyway and judges what was seen: without the evidence that is a failure, so a device
    nobody (successfully) uses does not commit silently. Requests the model refused as invalid
    input count as failures like errors: after a swap they are what the clients see (e.g. clients
    built for another input schema), and probation cannot tell them from the candidate's fault.
    Error rate and memory fail early (as soon as the window can no longer pass); p95 latency
    is judged when the window closes. Thread-safe.
    """

    def __init__(
        self,
        policy: HealthPolicy,
        clock: Callable[[], float] = time.monotonic,
        rss_mb: Callable[[], float] = current_rss_mb,
        max_wait_s: float | None = None,
        max_samples: int = 100_000,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rss = rss_mb
        self.started = clock()
        self.max_wait_s = max_wait_s if max_wait_s is not None else max(10 * policy.probation_seconds, 60.0)
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._max_samples = max_samples
        self.requests = 0
        self.errors = 0
        self.rejected = 0
        self.peak_rss_mb = 0.0
        self._early: Verdict | None = None
        self.rss_interval_s = 0.1
        self._rss_at = float("-inf")

    def observe(self, latency_s: float, ok: bool) -> None:
        """Feed one served request (wire to `ModelHolder.add_observer`)."""
        with self._lock:
            self.requests += 1
            if not ok:
                self.errors += 1
            if len(self._latencies) < self._max_samples:
                self._latencies.append(latency_s)
            if self.requests % 32 == 1:
                self.peak_rss_mb = max(self.peak_rss_mb, self._rss())

    def observe_rejected(self) -> None:
        """Feed one request the model refused as invalid input (`ModelHolder.add_reject_observer`)."""
        with self._lock:
            self.requests += 1
            self.rejected += 1

    def fail(self, reason: str, **measurements: float) -> None:
        """Force a failure (e.g. the watchdog saw a hung request)."""
        with self._lock:
            self._early = Verdict(False, reason, self._measure() | measurements)

    def _measure(self) -> dict[str, float]:
        failures = self.errors + self.rejected
        m = {
            "requests": float(self.requests),
            "errors": float(self.errors),
            "rejected": float(self.rejected),
            "successful": float(self.requests - failures),
            "error_rate": failures / self.requests if self.requests else 0.0,
            "elapsed_s": self._clock() - self.started,
            "latency_budget_ms": self.policy.latency_budget_ms,
            "peak_rss_mb": self.peak_rss_mb,
        }
        if self._latencies:
            m["p95_ms"] = float(np.percentile(np.array(self._latencies), 95)) * 1000.0
        return m

    def verdict(self) -> Verdict | None:
        """None while the window is open; otherwise the decision."""
        p = self.policy
        with self._lock:
            if self._early is not None:
                return self._early
            now = self._clock()
            if now - self._rss_at >= self.rss_interval_s:  # /proc reads are not free
                self._rss_at = now
                self.peak_rss_mb = max(self.peak_rss_mb, self._rss())
            m = self._measure()
            if p.max_memory_mb is not None and self.peak_rss_mb > p.max_memory_mb:
                return Verdict(False, f"memory {self.peak_rss_mb:.1f} MB over {p.max_memory_mb} MB", m)
            # the error budget of the whole window is spent: no need to wait
            failures = self.errors + self.rejected
            allowed = p.max_error_rate * max(p.probation_requests, self.requests)
            if failures > allowed and failures > 0:
                return Verdict(False, self._error_reason(m), m)
            elapsed = m["elapsed_s"]
            evidence = p.traffic == "none" or m["successful"] >= p.min_successful_requests
            enough = self.requests >= p.probation_requests and elapsed >= p.probation_seconds and evidence
            if not enough and elapsed < self.max_wait_s:
                return None
            if "p95_ms" in m and m["p95_ms"] > p.latency_budget_ms:
                reason = f"p95 latency {m['p95_ms']:.3f} ms over budget {p.latency_budget_ms} ms"
                return Verdict(False, reason, m)
            if self.requests and m["error_rate"] > p.max_error_rate:
                return Verdict(False, self._error_reason(m), m)
            if not evidence:
                return Verdict(False, (
                    f"no evidence: {m['successful']:.0f} successful requests in {elapsed:.0f}s, the health "
                    f"policy needs {p.min_successful_requests} (health.traffic 'none' commits on golden "
                    "vectors alone)"), m)
            note = "" if enough else f"window closed after {elapsed:.0f}s with {self.requests} requests"
            return Verdict(True, note or "healthy", m)

    def _error_reason(self, m: dict[str, float]) -> str:
        reason = f"error rate {m['error_rate']:.3f} over {self.policy.max_error_rate}"
        if self.rejected:
            reason += (f": {self.rejected} of {self.requests} requests rejected as invalid input "
                       "since the swap (do the clients send what this model takes?)")
        return reason


def fmt_measurements(m: dict[str, float]) -> dict[str, float]:
    """Rounded copy for events and logs."""
    return {k: round(v, 4) for k, v in m.items()}


__all__ = [
    "GoldenResult",
    "Probation",
    "RuntimeFailure",
    "Verdict",
    "check_golden",
    "current_rss_mb",
    "fmt_measurements",
    "hung_threads",
    "run_with_deadline",
]

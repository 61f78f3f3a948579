"""Helpers shared by the fleet store and API tests (not a conftest: imported explicitly)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    """An injected clock the test moves by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


DIGEST = "sha256:" + "ab" * 32

"""Agent-side trust: the TUF client (python-tuf `Updater`) behind pluggable fetchers.

`TrustClient` refreshes TUF metadata and downloads verified targets; director documents are
verified by the pure functions in `agent.contract.director` against the anchor carried in the
trusted root (`TrustClient.director_trust()`).
"""

from typing import TYPE_CHECKING, Any

from agent.trust.client import TrustClient, TrustSession

if TYPE_CHECKING:
    from agent.trust.fetchers import DirectoryFetcher, MemoryFetcher, http_fetcher

__all__ = ["DirectoryFetcher", "MemoryFetcher", "TrustClient", "TrustSession", "http_fetcher"]

_FETCHERS = {"DirectoryFetcher", "MemoryFetcher", "http_fetcher"}


def __getattr__(name: str) -> Any:
    """The fetchers load lazily: they subclass python-tuf's client (~12 MB RSS with its deps)."""
    if name in _FETCHERS:
        from agent.trust import fetchers  # lazy: python-tuf's client, ~12 MB RSS

        return getattr(fetchers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

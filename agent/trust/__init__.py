"""Agent-side trust: the TUF client (python-tuf `Updater`) behind pluggable fetchers.

`TrustClient` refreshes TUF metadata and downloads verified targets; director documents are
verified by the pure functions in `agent.contract.director` against the anchor carried in the
trusted root (`TrustClient.director_trust()`).
"""

from agent.trust.client import TrustClient, TrustSession
from agent.trust.fetchers import DirectoryFetcher, MemoryFetcher, http_fetcher

__all__ = ["DirectoryFetcher", "MemoryFetcher", "TrustClient", "TrustSession", "http_fetcher"]

"""Fetchers the TUF `Updater` downloads through: HTTP, memory and a local directory.

All implement `tuf.ngclient.FetcherInterface` (only `_fetch(url)`), so the MQTT fetcher can
replace them. A missing object raises `DownloadHTTPError(..., 404)`: python-tuf treats only
403/404 as "no newer root", which ends a root rotation walk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

_CHUNK = 64 * 1024


def http_fetcher(timeout_s: int = 30, user_agent: str = "edgefleet") -> FetcherInterface:
    """python-tuf's own urllib3 fetcher (timeouts, proxies, retries): not re-implemented here."""
    return Urllib3Fetcher(socket_timeout=timeout_s, app_user_agent=user_agent)


class MemoryFetcher(FetcherInterface):
    """Serves `url -> bytes` from a dict (tests, and objects already received some other way)."""

    def __init__(self, objects: Mapping[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.requested: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requested.append(url)
        data = self.objects.get(url)
        if data is None:
            raise DownloadHTTPError(f"not found: {url}", 404)
        return iter([data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""])


class DirectoryFetcher(FetcherInterface):
    """Serves a repository directory from disk: `<prefix>/<rel>` maps to `<root>/<rel>`.

    Used for local installs (a repository copied onto the device) and tests; paths that
    escape the directory are refused as 404 rather than read.
    """

    def __init__(self, root: Path, prefix: str = "file://repo/") -> None:
        self.root = Path(root).resolve()
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.requested: list[str] = []

    def url_for(self, rel: str) -> str:
        """The URL under which `rel` (e.g. `metadata` or `targets`) is served."""
        return self.prefix + rel.strip("/")

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requested.append(url)
        if not url.startswith(self.prefix):
            raise DownloadHTTPError(f"not under {self.prefix}: {url}", 404)
        rel = unquote(urlparse(url[len(self.prefix) :]).path)
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise DownloadHTTPError(f"not found: {url}", 404)
        return self._chunks(path)

    @staticmethod
    def _chunks(path: Path) -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk

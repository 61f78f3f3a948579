"""The MQTT fetcher's settings, apart from the fetcher.

Why apart: the daemon builds them from its config file at start, but the fetcher itself
(`agent.transport.mqtt_fetcher`) loads python-tuf's client and cryptography (~12 MB RSS), so
it is imported only when the first update cycle needs it.
"""

from __future__ import annotations

from typing import Annotated

from agent.contract.protocol import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from agent.contract.strict import Meta, StrictStruct


class FetcherConfig(StrictStruct, frozen=True, kw_only=True):
    """Chunking, flow control and limits of the MQTT fetcher (sizes in bytes, times in seconds)."""

    chunk_size: Annotated[int, Meta(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)] = DEFAULT_CHUNK_SIZE
    window: Annotated[int, Meta(ge=1, le=64)] = 4
    chunk_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    chunk_retries: Annotated[int, Meta(ge=0, le=100)] = 5
    busy_backoff_s: Annotated[float, Meta(ge=0, le=60)] = 0.2
    reconnect_wait_s: Annotated[float, Meta(ge=0, le=3600)] = 60.0
    max_object_bytes: Annotated[int, Meta(ge=1, le=2**40)] = 512 * 1024 * 1024
    fsync_every_chunks: Annotated[int, Meta(ge=1, le=10_000)] = 32

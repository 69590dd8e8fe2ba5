"""The provider HTTP transport: the one place that builds the ``httpx.AsyncClient`` adapters use.

This is the seam a benchmark may swap. httpx's own connection pool (httpcore 1.0.x) slows down
under high concurrency on this machine (encode/httpx#3215; see ``shared/MEASURED.md``), and the
``httpx-aiohttp`` transport, which keeps httpx's API over aiohttp's pool, is the candidate
replacement. Adapters only see an ``httpx.AsyncClient``, so changing the transport here changes
no adapter.
"""

from __future__ import annotations

import httpx

from broker.config import ProviderConfig

__all__ = ["make_http_client"]

_MAX_CONNECT_TIMEOUT_S = 10.0


def make_http_client(provider: ProviderConfig) -> httpx.AsyncClient:
    """A pooled client sized to the provider's concurrency cap; no base URL (adapters build it)."""
    limits = httpx.Limits(
        max_connections=provider.concurrency,
        max_keepalive_connections=provider.concurrency,
    )
    timeout = httpx.Timeout(
        provider.timeout_s, connect=min(_MAX_CONNECT_TIMEOUT_S, provider.timeout_s)
    )
    return httpx.AsyncClient(limits=limits, timeout=timeout)

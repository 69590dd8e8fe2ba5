"""The provider HTTP transport: the one place that builds the ``httpx.AsyncClient`` adapters use.

Adapters only see an ``httpx.AsyncClient``; ``SWITCHYARD_HTTP_TRANSPORT`` picks what carries it:
``httpx`` (httpcore's pool) or ``aiohttp`` (the ``httpx-aiohttp`` transport: httpx's API over
aiohttp's pool). httpcore 1.0.x does work that grows with requests x connections under
concurrency (encode/httpx#3215; ``shared/MEASURED.md``), which is why the other exists; the bench
(``ops/bench``) measures both and ARCHITECTURE.md records the choice.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from broker.config import ProviderConfig
from broker.settings import get_settings

__all__ = ["make_http_client"]

_MAX_CONNECT_TIMEOUT_S = 10.0


class _MappedAiohttpTransport(AiohttpTransport):
    """httpx-aiohttp 0.2 lets ``asyncio.TimeoutError`` escape and maps a dropped connection to
    ``ConnectTimeout``; map both to what httpx itself raises, so adapters see one error model."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out", request=request) from exc
        except httpx.ConnectTimeout as exc:
            if isinstance(exc.__cause__, aiohttp.ServerDisconnectedError):
                raise httpx.RemoteProtocolError("server disconnected", request=request) from exc
            raise


def make_http_client(provider: ProviderConfig) -> httpx.AsyncClient:
    """A pooled client sized to the provider's concurrency cap; no base URL (adapters build it)."""
    limits = httpx.Limits(
        max_connections=provider.concurrency,
        max_keepalive_connections=provider.concurrency,
    )
    timeout = httpx.Timeout(
        provider.timeout_s, connect=min(_MAX_CONNECT_TIMEOUT_S, provider.timeout_s)
    )
    if get_settings().http_transport == "aiohttp":
        return httpx.AsyncClient(
            transport=_MappedAiohttpTransport(limits=limits), limits=limits, timeout=timeout
        )
    return httpx.AsyncClient(limits=limits, timeout=timeout)

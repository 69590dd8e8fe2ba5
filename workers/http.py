"""The provider HTTP transport: the one place that builds the HTTP client adapters use.

Adapters see an ``httpx.AsyncClient``; ``SWITCHYARD_HTTP_TRANSPORT`` picks what carries it:
``httpx`` (httpcore's pool) or ``aiohttp`` (the ``httpx-aiohttp`` transport: httpx's API over
aiohttp's pool). httpcore 1.0.x does work that grows with requests x connections under
concurrency (encode/httpx#3215; docs/architecture.md), which is why the other exists.

Even over aiohttp's pool, httpx's client layers (request building, URL merging, cookie extraction,
auth and redirect hooks) cost as much CPU as aiohttp itself (docs/architecture.md). So the call
every completion makes, one JSON ``POST`` read whole, goes through ``post``: on the aiohttp
transport it runs on aiohttp's session directly, with the same timeouts and the same httpx
exceptions; streams and the ``httpx`` transport use httpx as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions

from broker.core.config import ProviderConfig
from broker.core.settings import get_settings

__all__ = ["ProviderClient", "make_http_client", "post"]

_MAX_CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def _httpx_errors(request: Callable[[], httpx.Request]) -> Iterator[None]:
    """aiohttp's failures as the httpx exceptions httpx itself raises. httpx-aiohttp 0.2 maps
    most, but lets ``asyncio.TimeoutError`` and a malformed answer (aiohttp's parser error, a
    ``ClientResponseError``) escape, and reports every connection failure, a refused connection
    and a dropped one included, as ``ConnectTimeout`` (a timeout, which adapters would report as
    one). ``request`` makes the exceptions' request, only when one is raised (building an
    ``httpx.Request`` parses its URL, a cost on every call)."""
    try:
        with map_aiohttp_exceptions():
            yield
    except aiohttp.ClientResponseError as exc:  # a bad status line, header or chunk
        raise httpx.RemoteProtocolError(
            f"malformed response: {exc.message}", request=request()
        ) from exc
    except TimeoutError as exc:
        raise httpx.ReadTimeout("timed out", request=request()) from exc
    except httpx.ConnectTimeout as exc:
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            raise httpx.RemoteProtocolError("server disconnected", request=request()) from exc
        if isinstance(cause, aiohttp.ClientConnectorError):
            raise httpx.ConnectError("connection failed", request=request()) from exc
        if isinstance(cause, aiohttp.ClientOSError):
            raise httpx.ReadError("connection broken", request=request()) from exc
        raise


class _MappedAiohttpTransport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors(lambda: request):
            return await super().handle_async_request(request)

    def session(self) -> aiohttp.ClientSession:
        """aiohttp's session under this transport (made on first use, as the transport does)."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        return self.client


class ProviderClient(httpx.AsyncClient):
    """httpx's client on the aiohttp transport, with the session kept at hand for ``post``."""

    def __init__(self, transport: _MappedAiohttpTransport, timeout: httpx.Timeout) -> None:
        super().__init__(transport=transport, limits=transport.limits, timeout=timeout)
        self.aiohttp_transport = transport
        self.aiohttp_timeout = aiohttp.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )
        # httpx's defaults (user-agent, accept-encoding: what httpx can decode), as it sends them
        self.default_headers = self.headers.multi_items()

    def headers_for(self, headers: httpx.Headers) -> list[tuple[str, str]]:
        """``headers`` over the client's defaults, as httpx merges them."""
        given = headers.multi_items()
        names = {name.lower() for name, _ in given}
        return [(k, v) for k, v in self.default_headers if k.lower() not in names] + given


async def post(
    http: httpx.AsyncClient, url: str, content: bytes, headers: httpx.Headers
) -> httpx.Response:
    """``POST`` ``content`` and read the whole answer."""
    if not isinstance(http, ProviderClient):
        return await http.post(url, content=content, headers=headers)
    with _httpx_errors(lambda: httpx.Request("POST", url)):
        async with http.aiohttp_transport.session().post(
            url,
            data=content,
            headers=http.headers_for(headers),
            allow_redirects=False,
            auto_decompress=False,  # httpx decodes, by the encodings it asked for
            timeout=http.aiohttp_timeout,
        ) as response:
            body = await response.read()
    return _read_response(response.status, response.raw_headers, body)


def _read_response(
    status: int, raw_headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> httpx.Response:
    """An ``httpx.Response`` of a body already read. Given ``content=``, httpx's constructor runs
    its whole streaming read (chunker, decoders, close), a cost on every call; a
    body with no content-encoding needs none of it, so it is handed over as read, where httpx
    keeps a read body. An encoded one is read through httpx's decoders, as before."""
    response = httpx.Response(status, headers=raw_headers, stream=httpx.ByteStream(body))
    if "content-encoding" in response.headers:
        response.read()
    else:
        response._content = body
        response.is_stream_consumed = response.is_closed = True
    return response


def make_http_client(
    provider: ProviderConfig, transport: Literal["httpx", "aiohttp"] | None = None
) -> httpx.AsyncClient:
    """A pooled client sized to the provider's concurrency cap; no base URL (adapters build it).
    ``transport`` defaults to ``SWITCHYARD_HTTP_TRANSPORT``."""
    limits = httpx.Limits(
        max_connections=provider.concurrency,
        max_keepalive_connections=provider.concurrency,
    )
    timeout = httpx.Timeout(
        provider.timeout_s, connect=min(_MAX_CONNECT_TIMEOUT_S, provider.timeout_s)
    )
    if (transport or get_settings().http_transport) == "aiohttp":
        return ProviderClient(_MappedAiohttpTransport(limits=limits), timeout)
    return httpx.AsyncClient(limits=limits, timeout=timeout)

"""One webhook POST, and what came of it: a status, or no answer and why.

httpx's client over aiohttp's pool (``httpx-aiohttp``, as the workers' provider client; measured
far faster under concurrency than httpcore's pool: docs/architecture.md). Redirects are not
followed, proxies from the environment are not used, and the pool resolves names through the
SSRF guard: an address a webhook may not reach is refused as the connection is made, so a name
re-pointed after the attempt's own check cannot slip through. An IP literal is checked before
the POST (aiohttp does not resolve it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from broker.core.errors import InvalidMessage
from broker.core.webhook_urls import refuse_addresses
from broker.core.webhooks import WebhooksConfig

__all__ = ["USER_AGENT", "Answer", "Sender"]

log = logging.getLogger(__name__)

USER_AGENT = "Switchyard-Webhooks/1 (+https://www.standardwebhooks.com/)"
MAX_ANSWER_BYTES = 64 * 1024
"""The most of a receiver's answer read (so its connection can be kept); the rest is dropped."""
DNS_CACHE_S = 10
"""Addresses are kept this long once resolved (and checked); a reload of ``allow`` starts a new
pool, so nothing checked under the old list is reused."""


@dataclass(frozen=True, slots=True)
class Answer:
    """How one POST went: ``status_code`` if answered, else ``error``; ``refused`` if the SSRF
    guard stopped it as it connected."""

    latency_ms: float
    status_code: int | None = None
    error: str | None = None
    refused: str | None = None


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver behind the SSRF guard: every address a name resolves to must pass."""

    def __init__(self, allow: Sequence[str]) -> None:
        self._allow = tuple(allow)
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        refuse_addresses(host, [info["host"] for info in found], self._allow)
        return found

    async def close(self) -> None:
        await self._inner.close()


def _client(config: WebhooksConfig) -> httpx.AsyncClient:
    allow, limit = tuple(config.allow), config.concurrency

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=limit, resolver=_GuardedResolver(allow), ttl_dns_cache=DNS_CACHE_S
        )
        return aiohttp.ClientSession(connector=connector, trust_env=False)

    return httpx.AsyncClient(
        transport=AiohttpTransport(client=session),
        timeout=httpx.Timeout(config.timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


def _failure(exc: BaseException, timeout_s: float) -> str:
    """Why a POST got no answer, by kind (never the exception's text: it may hold the URL).
    httpx-aiohttp reports aiohttp's failures as httpx's, not always the right one (a refused
    connection as a connect timeout): the cause says what happened."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ else exc
    if isinstance(cause, aiohttp.ClientConnectorCertificateError):
        return "the receiver's TLS certificate was refused"
    if isinstance(cause, aiohttp.ClientConnectorError):
        return f"connection failed ({cause.os_error.strerror or type(cause.os_error).__name__})"
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection without answering"
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    return f"request failed ({type(cause).__name__})"


class Sender:
    """POSTs webhooks through one pool, replaced when a reload changes what it was built on."""

    def __init__(self, config: WebhooksConfig) -> None:
        self._config = config
        self._client = _client(config)
        self._retired: set[asyncio.Task[None]] = set()

    def use(self, config: WebhooksConfig) -> None:
        """Take a new config; a new pool if its allow list, timeout or concurrency changed
        (the old one closes once its requests are done, within the old timeout)."""
        shape = ("allow", "timeout_s", "concurrency")
        changed = any(getattr(config, f) != getattr(self._config, f) for f in shape)
        old, old_timeout = self._client, self._config.timeout_s
        self._config = config
        if changed:
            self._client = _client(config)
            task = asyncio.create_task(_close_later(old, old_timeout))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """POST ``body`` within ``timeout_s`` (the whole attempt), reading a bounded answer."""
        timeout_s = self._config.timeout_s
        started = time.perf_counter()

        def took() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        try:
            async with asyncio.timeout(timeout_s):
                request = self._client.stream("POST", url, content=body, headers=headers)
                async with request as response:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
                    return Answer(took(), status_code=response.status_code)
        except InvalidMessage as exc:  # the guarded resolver refused an address
            return Answer(took(), error=exc.message, refused=exc.message)
        except (
            httpx.HTTPError,
            httpx.InvalidURL,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as exc:
            return Answer(took(), error=_failure(exc, timeout_s))

    async def aclose(self) -> None:
        await self._client.aclose()
        retired = list(self._retired)
        for task in retired:
            task.cancel()  # each closes its pool as it ends
        await asyncio.gather(*retired, return_exceptions=True)


async def _close_later(client: httpx.AsyncClient, after_s: float) -> None:
    try:
        await asyncio.sleep(after_s)
    finally:
        await client.aclose()

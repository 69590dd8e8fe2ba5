"""The versions of one provider's config entry a worker pool calls with: the current one serves
new calls, a replaced one finishes the calls it has and closes after its last."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from redis.asyncio import Redis

from broker.core.config import ProviderConfig
from broker.core.errors import ConfigError
from broker.core.names import Names
from broker.state.leases import LeaseSemaphore
from workers.adapters import ProviderAdapter, adapter_for
from workers.http import make_http_client
from workers.retry import MAX_BACKOFF_S

__all__ = ["ProviderClient", "ProviderClients"]


@dataclass(eq=False)
class ProviderClient:
    """One version of the provider's entry: its adapter over its own HTTP client, and the global
    leases. Calls hold it from start to end."""

    provider: ProviderConfig
    http: httpx.AsyncClient
    adapter: ProviderAdapter
    leases: LeaseSemaphore | None
    calls: int = 0
    retired: bool = False


class ProviderClients:
    def __init__(self, provider: ProviderConfig, names: Names, redis: Redis | None) -> None:
        self._names = names
        self._redis = redis
        self.current = self._build(provider)
        self._open: set[ProviderClient] = {self.current}

    def _build(self, provider: ProviderConfig) -> ProviderClient:
        http = make_http_client(provider)
        leases = None
        if provider.global_concurrency is not None:
            if self._redis is None:
                raise ConfigError(f"provider {provider.id!r} sets global_concurrency: needs Redis")
            # A lease outlives the worst case of one job (every attempt timing out, backoffs
            # between), so it is never taken from a live call; a dead worker's expires.
            lease_s = (
                provider.timeout_s * provider.max_attempts
                + MAX_BACKOFF_S * (provider.max_attempts - 1)
                + 2
            )
            leases = LeaseSemaphore(
                self._redis,
                self._names.lease(provider.id),
                provider.global_concurrency,
                lease_s,
            )
        return ProviderClient(provider, http, adapter_for(provider, http), leases)

    def replace(self, provider: ProviderConfig) -> ProviderClient:
        """Serve the next calls with ``provider``'s entry (raising, if it cannot be built,
        before anything changes); the calls in flight keep theirs. Returns the replaced one,
        for ``retire``."""
        replaced, self.current = self.current, self._build(provider)
        self._open.add(self.current)
        replaced.retired = True
        return replaced

    async def retire(self, client: ProviderClient) -> None:
        """Close a replaced client now if no call holds it (else its last call closes it)."""
        if client.calls == 0 and client in self._open:
            await self._close(client)

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[ProviderClient]:
        """The client for one job's calls; a replaced one closes after its last call."""
        client = self.current
        client.calls += 1
        try:
            yield client
        finally:
            client.calls -= 1
            if client.retired and client.calls == 0 and client in self._open:
                await self._close(client)

    async def close(self) -> None:
        for client in list(self._open):
            await self._close(client)

    async def _close(self, client: ProviderClient) -> None:
        self._open.discard(client)
        await client.http.aclose()

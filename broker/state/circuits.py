"""Each provider's circuit breaker, shared through Redis by every worker and scheduler.

Calls that fail for the provider's own reasons (``ProviderTimeout``, ``ProviderServerError``,
which includes a refused or dropped connection, and ``ProviderProtocolError``) count up; a call
that succeeds sets the count back to 0. Rate limits, refused requests and content filters say
nothing of the provider's health and count neither way. At ``circuit.failures`` in a row the
circuit opens for ``circuit.open_s``: routing drops the provider (step 4) and its workers answer
the jobs already queued for it with ``provider_unavailable`` at once instead of calling it. When
that time is up the circuit is half-open: each worker process lets one trial job through at a
time; any success closes the circuit (a late one from a call begun before it opened too), and a
failure of the kinds above opens it for another ``open_s``.

One hash per provider (``Names.circuit``: ``failures``, ``open_until`` in ms of Redis's clock).
A process reads it at most every ``REFRESH_S`` and works from that view in between, so routing and
calls wait for Redis at most once per ``REFRESH_S``, and never longer than ``READ_WAIT_S``; writes
go on failures, and on a success only while the count is above 0. Open and half-open are judged
by Redis's clock, carried forward by this process's monotonic one, so the processes' wall clocks
never matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from broker.core.config import CircuitConfig
from broker.core.metrics import CIRCUIT_OPENED
from broker.core.names import Names
from broker.core.tracing import untraced
from broker.state.lua import NOW_MS
from schemas import Attempt, ErrorCode

__all__ = ["CircuitState", "CircuitView", "Circuits", "failures_in"]

log = logging.getLogger(__name__)

REFRESH_S = 1.0
"""How stale a process's view of a circuit may be: a circuit opened by another process is seen
here within this long."""
READ_WAIT_S = 0.05
"""The longest a job waits for a circuit's read: a slow Redis must not hold up every job."""
KEEP_S = 24 * 3600
"""A circuit left alone this long is forgotten (closed, count 0)."""

# KEYS: circuit.  ARGV: failures to add, threshold, open_ms, keep_ms.
# -> {failures, open_until, now, opened (1 if this call opened it)}
_FAIL = (
    NOW_MS
    + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', ARGV[1])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local opened = 0
if failures >= tonumber(ARGV[2]) and open_until <= now then
  open_until = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'open_until', open_until)
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {failures, open_until, now, opened}
"""
)

# KEYS: circuit.  -> {failures, open_until, now}
_READ = (
    NOW_MS
    + """
local v = redis.call('HMGET', KEYS[1], 'failures', 'open_until')
return {tonumber(v[1] or '0'), tonumber(v[2] or '0'), now}
"""
)


UNWELL = frozenset({ErrorCode.TIMEOUT, ErrorCode.SERVER_ERROR, ErrorCode.PROVIDER_PROTOCOL_ERROR})
"""The failures that say the provider is unwell, rather than the request or a limit."""


def failures_in(attempts: list[Attempt]) -> int:
    """How many of a job's calls failed for the provider's own reasons."""
    return sum(1 for a in attempts if a.error_code in UNWELL)


@dataclass(frozen=True, slots=True)
class CircuitView:
    """One read of a circuit: its count and, if it opened, for how long from ``read_at``."""

    failures: int
    open_ms_left: int  # at read_at; 0 if it is not open
    read_at: float  # time.monotonic() of the read

    def open_s_left(self) -> float:
        """Seconds the circuit stays open from now."""
        return max(0.0, self.open_ms_left / 1000 - (time.monotonic() - self.read_at))

    def state(self, threshold: int) -> CircuitState:
        if not self.failures:  # every job's case: no clock read
            return CircuitState.CLOSED
        if self.open_ms_left and self.open_s_left() > 0:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN if self.failures >= threshold else CircuitState.CLOSED


class CircuitState(StrEnum):
    """Closed: calls go. Open: none go until it is half-open. Half-open: one trial call at a
    time per process, whose outcome closes or reopens it."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = CircuitView(0, 0, 0.0)


class Circuits:
    """The circuits of a namespace's providers, as this process last read or wrote them."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self._redis = redis
        self._names = names
        self._fail = redis.register_script(_FAIL)
        self._read = redis.register_script(_READ)
        self._views: dict[str, CircuitView] = {}
        self._reading: dict[str, asyncio.Task[None]] = {}

    def cached(self, provider_id: str) -> CircuitView:
        """The last view read or written here, without going to Redis."""
        return self._views.get(provider_id, _CLOSED)

    def fresh(self, provider_id: str) -> CircuitView | None:
        """The view if it is younger than ``REFRESH_S``: the per-job path, with no await."""
        view = self._views.get(provider_id)
        if view is not None and time.monotonic() - view.read_at < REFRESH_S:
            return view
        return None

    async def view(self, provider_id: str) -> CircuitView:
        """The circuit as of at most ``REFRESH_S`` ago, waiting at most ``READ_WAIT_S`` for Redis:
        a breaker must not stop the calls it guards."""
        view = self.fresh(provider_id)
        if view is not None:
            return view
        # One read per provider at a time, shared by the jobs that need it; a slow Redis finishes
        # it in the background, and until then the last view stands.
        reading = self._reading.get(provider_id)
        if reading is None:
            reading = asyncio.create_task(self._read_into_view(provider_id), context=untraced())
            self._reading[provider_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(provider_id, None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), READ_WAIT_S)
        return self._views.get(provider_id, _CLOSED)

    async def read(self, provider_id: str) -> CircuitView:
        """Read the circuit from Redis now (it becomes this process's view); raises if Redis
        does not answer."""
        values: Any = await self._read(keys=[self._names.circuit(provider_id)])
        failures, open_until, now = (int(v) for v in values)
        view = CircuitView(failures, max(0, open_until - now), time.monotonic())
        self._views[provider_id] = view
        return view

    async def _read_into_view(self, provider_id: str) -> None:
        try:
            await self.read(provider_id)
        except Exception:
            # Not tried again for REFRESH_S; the view lapses to closed once its open time has
            # passed, since without Redis nothing could close it.
            log.warning("could not read the circuit of %r", provider_id, exc_info=True)
            last = self._views.get(provider_id, _CLOSED)
            open_ms = round(last.open_s_left() * 1000)
            self._views[provider_id] = CircuitView(
                last.failures if open_ms else 0, open_ms, time.monotonic()
            )

    async def failed(self, provider_id: str, config: CircuitConfig, failures: int = 1) -> bool:
        """Count ``failures`` failed calls; True if they opened the circuit."""
        values: Any = await self._fail(
            keys=[self._names.circuit(provider_id)],
            args=[failures, config.failures, round(config.open_s * 1000), KEEP_S * 1000],
        )
        count, open_until, now, opened = (int(v) for v in values)
        self._views[provider_id] = CircuitView(count, max(0, open_until - now), time.monotonic())
        if opened:
            CIRCUIT_OPENED.labels(provider_id).inc()
            log.warning(
                "circuit of %r opened for %.0f s after %d failed calls in a row",
                provider_id,
                config.open_s,
                count,
            )
        return bool(opened)

    async def succeeded(self, provider_id: str) -> None:
        """A call succeeded: close the circuit. Costs a write only if the count was above 0
        (as this process last saw it)."""
        if self.cached(provider_id).failures == 0:
            return
        log.info("circuit of %r closed: a call succeeded", provider_id)
        await self.close(provider_id)

    async def close(self, provider_id: str) -> None:
        """Close the circuit, its count back to 0 (a success, or an operator after a fix). Here
        first: a Redis that fails the write must not keep this process refusing."""
        self._views[provider_id] = CircuitView(0, 0, time.monotonic())
        await self._redis.delete(self._names.circuit(provider_id))

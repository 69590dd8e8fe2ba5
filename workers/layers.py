"""The concerns around one provider call, as ordered layers (dramatiq's middleware, in spirit).

A worker pool chains them outermost first (``WorkerPool`` lists them in one place):

    PrioritySlot    a call slot: calls start by priority, then arrival
    deadline        a job whose deadline passed while it waited is not called
    ProviderVersion the provider entry (adapter, HTTP client, leases) the call uses to its end
    Pricing         each usage event priced once, at the call
    CircuitBreaker  an open circuit refuses the call; each call's outcome is counted
    GlobalLease     one of the provider's global leases held for the call
    CallClaim       a tracked job cancelled first is not called; each call is counted
    CallLedger      each call recorded (confirmed) in the ledger before its request leaves
                    (``workers.ledger``, with ``CallClaim``)
    call_provider   the adapter, through the retry layer (``workers.retry``)

Each layer is ``async (proceed, call) -> CallOutcome``; it may act before and after ``proceed``
or answer without it. What a layer learns (the start time, the client) it puts on the ``Call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from broker.core.clock import utcnow
from broker.core.config import Config, ProviderConfig
from broker.core.errors import DeadlineExceeded, ProviderUnavailable, Unavailable
from broker.core.pricing import call_cost, price_usage
from broker.state.circuits import REFRESH_S, Circuits, CircuitState, failures_in
from broker.state.fairness import PrioritySlots
from broker.state.leases import LeaseSemaphore
from broker.state.quota import REDIS_FAILURES
from schemas import Attempt, CompletionJob
from workers.clients import ProviderClient, ProviderClients
from workers.retry import CallOutcome, OnChunk, OnStart, call_with_retries

__all__ = [
    "Call",
    "CircuitBreaker",
    "GlobalLease",
    "Layer",
    "Pricing",
    "PrioritySlot",
    "ProviderVersion",
    "call_provider",
    "chain",
    "deadline",
]

log = logging.getLogger(__name__)

LEASE_WAIT_S = 30.0
"""How long one wait for a global lease lasts before it starts again (and looks at the
job's deadline)."""
REDIS_RETRY_S = 5.0
"""While Redis is away: how often a waiting job tries for a lease again, and the
``retry_after`` an RPC job is told."""
REDIS_WAIT_S = 600.0
"""The longest a persistent job holds its delivery waiting for Redis to grant a lease."""


@dataclass(slots=True)
class Call:
    """One job's way through the layers."""

    job: CompletionJob
    priority: int
    on_chunk: OnChunk | None = None
    persistent: bool = False
    """The job came persistent (a batch job): it may wait for Redis; an RPC job may not."""
    started: datetime | None = None
    client: ProviderClient | None = None
    on_start: OnStart | None = None

    @property
    def provider(self) -> ProviderConfig:
        assert self.client is not None, "ProviderVersion runs before the layers that need it"
        return self.client.provider


Proceed = Callable[[Call], Awaitable[CallOutcome]]
Layer = Callable[[Proceed, Call], Awaitable[CallOutcome]]


def chain(layers: Sequence[Layer], innermost: Proceed) -> Proceed:
    """``innermost`` wrapped in ``layers``, the first one outermost."""
    proceed = innermost
    for layer in reversed(layers):
        proceed = functools.partial(layer, proceed)
    return proceed


class PrioritySlot:
    """Only the call holds a slot, whichever fairness lane its job came through: the next call
    starts while this job's result and event wait for their confirms."""

    def __init__(self, slots: PrioritySlots) -> None:
        self.slots = slots

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        async with self.slots.slot(call.priority):
            return await proceed(call)


async def deadline(proceed: Proceed, call: Call) -> CallOutcome:
    call.started = utcnow()
    if call.job.deadline is not None and call.job.deadline <= call.started:
        raise DeadlineExceeded("the job's deadline passed while it waited for a worker")
    return await proceed(call)


class ProviderVersion:
    """A new config version takes effect between calls: a call keeps its entry to its end."""

    def __init__(self, clients: ProviderClients) -> None:
        self.clients = clients

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        async with self.clients.use() as client:
            call.client = client
            return await proceed(call)


class Pricing:
    """Each usage event priced once, by the entry that served the call and the discount window
    in force when it happened: the job's result and the accountant's row carry this figure."""

    def __init__(self, config: Config) -> None:
        self.apply(config)

    def apply(self, config: Config) -> None:
        self._zone: ZoneInfo = config.zone
        self._version = config.version

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        # The version in force when the call starts, with the entry it starts on: a reload
        # during the call changes neither (``WorkerPool.apply`` swaps both without a pause).
        zone, version, models = self._zone, self._version, call.provider.models
        outcome = await proceed(call)
        for event in outcome.usage:
            price = models.get(event.model)
            if price is None and not event.free:
                log.warning("no price for %s/%s; cost left empty", event.provider, event.model)
            price_usage(event, price, zone, version)
        deferred = call.job.route.deferred_from if call.job.route is not None else None
        if deferred is not None and outcome.completion is not None and outcome.usage:
            # What waiting saved: the answer's tokens at the price when the job was deferred.
            answer = outcome.usage[-1]
            at_once = call_cost(
                models.get(answer.model),
                zone,
                deferred,
                answer.prompt_tokens,
                answer.completion_tokens,
            )
            if at_once is not None and answer.cost_usd is not None:
                outcome.saved_usd = at_once - answer.cost_usd
        return outcome

    def quote(
        self, provider: ProviderConfig, model: str, prompt: int, completion: int, *, free: bool
    ) -> tuple[Decimal | None, str]:
        """What these tokens cost now on ``provider``, and the version that priced them."""
        price = provider.models.get(model)
        return call_cost(price, self._zone, utcnow(), prompt, completion, free=free), self._version


class CircuitBreaker:
    """An open circuit answers the job ``provider_unavailable`` without a call; half-open lets
    one trial call from this process through; every call's outcome is counted."""

    def __init__(self, circuits: Circuits | None, name: str) -> None:
        self.circuits = circuits
        self.name = name
        self._trial = False  # the half-open circuit's one trial call from this process runs

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        if self.circuits is None:
            return await proceed(call)
        provider = call.provider
        refusal, trial = await self._gate(self.circuits, provider)
        try:
            if refusal is not None:
                return CallOutcome(error=refusal, attempts=[_refused(call.job, refusal)])
            outcome = await proceed(call)
            await self._count(self.circuits, provider, outcome)
            return outcome
        finally:
            if trial:
                self._trial = False

    async def _gate(
        self, circuits: Circuits, provider: ProviderConfig
    ) -> tuple[ProviderUnavailable | None, bool]:
        """``(None, False)``: the call may go; ``(None, True)``: as the trial call;
        ``(error, False)``: it may not, and the error answers the job."""
        view = circuits.fresh(provider.id) or await circuits.view(provider.id)
        state = view.state(provider.circuit.failures)
        if state is CircuitState.CLOSED:
            return None, False
        if state is CircuitState.HALF_OPEN and not self._trial:
            self._trial = True
            return None, True
        wait = view.open_s_left() if state is CircuitState.OPEN else REFRESH_S
        refusal = ProviderUnavailable(
            f"provider {provider.id!r} is unavailable: its circuit is {state.value} after"
            f" {view.failures} failed calls in a row; the job was not sent to it",
            provider=provider.id,
            retry_after=round(max(wait, 0.001), 3),
        )
        return refusal, False

    async def _count(
        self, circuits: Circuits, provider: ProviderConfig, outcome: CallOutcome
    ) -> None:
        """Its Redis failing must not fail a paid call."""
        try:
            if outcome.completion is not None:
                await circuits.succeeded(provider.id)
            elif failures := failures_in(outcome.attempts):
                await circuits.failed(provider.id, provider.circuit, failures)
        except Exception:
            log.warning("could not count a call in the circuit of %s", self.name, exc_info=True)


def _refused(job: CompletionJob, refusal: ProviderUnavailable) -> Attempt:
    """The record of a call an open circuit did not make: failover skips the provider."""
    assert job.route is not None
    return Attempt(
        number=len(job.attempts) + 1,
        provider=job.route.provider,
        model=job.route.model,
        status="failed",
        error_code=refusal.code,
        duration_ms=0,
    )


class GlobalLease:
    """With a global cap (``global_concurrency``), the call holds one of the provider's leases
    in Redis, waited for no later than the job's deadline and renewed while the call runs."""

    def __init__(self, holder: str, name: str) -> None:
        self.holder = holder
        self.name = name

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        leases = call.client.leases if call.client is not None else None
        if leases is None:
            return await proceed(call)
        async with self.hold(leases, call.job.deadline, may_wait=call.persistent):
            return await proceed(call)

    @contextlib.asynccontextmanager
    async def hold(
        self, leases: LeaseSemaphore, until: datetime | None, *, may_wait: bool = True
    ) -> AsyncIterator[None]:
        """Hold a lease for the call. With Redis away no lease can be had: a job that
        ``may_wait`` (a persistent one) keeps its delivery and tries again every
        ``REDIS_RETRY_S``, no later than its deadline or ``REDIS_WAIT_S``; an RPC job is
        answered ``unavailable`` with ``retry_after`` at once."""
        lease = None
        away_since: float | None = None
        while lease is None:
            wait_s = LEASE_WAIT_S
            if until is not None:
                wait_s = min(wait_s, (until - utcnow()).total_seconds())
                if wait_s <= 0:
                    raise DeadlineExceeded(
                        "the job's deadline passed while it waited for the provider's global"
                        " concurrency"
                    )
            try:
                lease = await leases.acquire_wait(self.holder, timeout_s=wait_s)
            except REDIS_FAILURES as exc:
                away_since = away_since or time.monotonic()
                if not may_wait or time.monotonic() - away_since >= REDIS_WAIT_S:
                    raise Unavailable(
                        f"Redis is unreachable ({type(exc).__name__}), so no lease on the"
                        f" provider's global concurrency could be had; the job was not run",
                        retry_after=REDIS_RETRY_S,
                    ) from exc
                log.warning("%s: Redis is away; a job waits for a lease", self.name)
                await asyncio.sleep(min(REDIS_RETRY_S, max(wait_s, 0.0)))
        keeping = asyncio.create_task(self._keep(leases, lease))
        try:
            yield
        finally:
            keeping.cancel()
            try:
                await leases.release(lease)
            except Exception:
                # The call is done (and paid for): its result must not turn into a failure.
                # An unreturned lease expires on its own (``lease_s``).
                log.warning("could not return a global lease of %s; it expires", self.name)

    async def _keep(self, leases: LeaseSemaphore, lease: str) -> None:
        """Renew at a third of its life: ``timeout_s`` bounds each read, not a call, so a stream
        can outlast the lease, and another worker would take the slot while it still runs."""
        while True:
            await asyncio.sleep(leases.lease_s / 3)
            try:
                if not await leases.renew(lease):
                    log.warning("a global lease of %s expired during its call", self.name)
                    return
            except Exception:
                log.warning("could not renew a global lease of %s", self.name, exc_info=True)


async def call_provider(call: Call) -> CallOutcome:
    """The innermost layer: the adapter's call, retried as the provider's entry allows."""
    provider = call.provider
    assert call.client is not None
    return await call_with_retries(
        call.client.adapter,
        call.job,
        max_attempts=provider.max_attempts,
        on_chunk=call.on_chunk,
        on_start=call.on_start,
    )

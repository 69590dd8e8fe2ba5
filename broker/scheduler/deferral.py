"""Deferral: a job that may wait (``defer: true``; every stored batch's line) is parked until
a cheaper hour, a discount window opening or a free tier's limits resetting, when that hour
comes early enough for its call to finish before its deadline; a job whose deadline does not
allow the wait is served at once. This module decides; ``parking.defer`` holds the wait in the
durable parking queues."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from broker.core.config import Config
from broker.core.pricing import cost_usd
from broker.scheduler.candidates import Candidate, ProviderState
from broker.scheduler.routing import RouteDecision
from schemas import CompletionJob

__all__ = ["FINISH_MARGIN_S", "defer_until"]

FINISH_MARGIN_S = 300.0
"""A cheaper hour must come at least this long before the job's deadline: its call, retries and
any queueing then still fit."""


def defer_until(
    job: CompletionJob,
    decision: RouteDecision,
    states: Mapping[str, ProviderState],
    config: Config,
    now: datetime,
) -> datetime | None:
    """The soonest moment a candidate of the job's serves it for less than the chosen one does
    now, if that is early enough; None: serve it now."""
    if not job.defer or job.deadline is None:
        return None
    cost_now = decision.chosen.est_cost_usd
    if cost_now <= 0:
        return None
    latest = job.deadline - timedelta(seconds=FINISH_MARGIN_S)
    soonest: datetime | None = None
    # Another candidate's cheaper hour helps only where the policy orders by cost: under the
    # others the same candidate would be chosen again, and the job would wait for nothing.
    by_cost = decision.policy in ("cheapest", "free_first")
    for candidate in (decision.chosen, *(decision.alternatives if by_cost else ())):
        state = states.get(candidate.provider.id)
        for opens, cost in _cheaper_hours(candidate, state, config, now):
            if cost < cost_now and opens <= latest and (soonest is None or opens < soonest):
                soonest = opens
    return soonest


def _cheaper_hours(
    candidate: Candidate, state: ProviderState | None, config: Config, now: datetime
) -> Iterator[tuple[datetime, Decimal]]:
    """When each of the candidate's discount windows next opens, with what the job would cost
    then; and when its spent free tier resets (free then)."""
    spec = candidate.provider.models[candidate.model]
    for discount in spec.discounts:
        opens = discount.next_start(now, config.zone)
        if opens is not None:
            multiplier = spec.multiplier_at(opens + timedelta(seconds=1), config.zone)
            prompt, output = candidate.est_prompt_tokens, candidate.est_output_tokens
            yield opens, cost_usd(spec, prompt, output, multiplier)
    if state is not None and state.free_resets_at is not None:
        yield datetime.fromtimestamp(state.free_resets_at, UTC), Decimal(0)

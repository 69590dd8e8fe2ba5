"""The call layer that measures: each provider call's latency, time to first chunk and error in
Prometheus, and its latency and health in the shared provider stats that routing reads
(``broker.state.provider_stats``). It sits innermost, so it sees the calls made, not the jobs an
open circuit or a cancel answered without one."""

from __future__ import annotations

from broker.core.metrics import PROVIDER_ERRORS, PROVIDER_LATENCY, PROVIDER_TTFT, RETRIES
from broker.state.circuits import UNWELL
from broker.state.provider_stats import Outcome, StatsRecorder
from schemas import Attempt
from workers.layers import Call, Proceed
from workers.retry import CallOutcome

__all__ = ["CallMeter"]


class CallMeter:
    """Measures every attempt of a call; ``stats`` (None without Redis) gets each one too."""

    def __init__(self, stats: StatsRecorder | None) -> None:
        self.stats = stats

    async def __call__(self, proceed: Proceed, call: Call) -> CallOutcome:
        outcome = await proceed(call)
        made = 0
        for attempt in outcome.attempts:
            if attempt.call_id is None:  # not made
                continue
            made += 1
            provider, model = attempt.provider, attempt.model
            if attempt.error_code is None:
                PROVIDER_LATENCY.labels(provider, model).observe(attempt.duration_ms / 1000)
            else:
                PROVIDER_ERRORS.labels(provider, model, attempt.error_code.value).inc()
            if attempt.ttft_ms is not None:
                PROVIDER_TTFT.labels(provider, model).observe(attempt.ttft_ms / 1000)
            if self.stats is not None:
                self.stats.record(provider, model, attempt.duration_ms, _outcome(attempt))
        if made > 1:
            route = call.job.route
            assert route is not None
            RETRIES.labels(route.provider, route.model).inc(made - 1)
        return outcome


def _outcome(attempt: Attempt) -> Outcome:
    if attempt.error_code is None:
        return Outcome.ANSWERED
    return Outcome.UNWELL if attempt.error_code in UNWELL else Outcome.OTHER

"""The ledger's figures as Prometheus metrics, counted by the accountant from the events it has
just written, so a dashboard's tokens, cost and job counts are Postgres's (and, at DEBUG, a log
line per job with its trace id).

A message written twice (its accountant died after the commit, before the ack) is counted twice
here while Postgres keeps one row: the ledger stays the reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from decimal import Decimal

from broker.core.config import Config
from broker.core.metrics import COST, JOB_DURATION, JOB_WAIT, JOBS_FINISHED, TOKENS, bounded
from schemas import CallStarted, JobEvent, JobStatus, UsageEvent

__all__ = ["Observed"]

log = logging.getLogger(__name__)


class Observed:
    """Counts written events; the names it may use as labels come from the config."""

    def __init__(self, config: Config) -> None:
        self.apply(config)

    def apply(self, config: Config) -> None:
        self._task_types = frozenset(config.routes)

    def count(self, events: Iterable[JobEvent | UsageEvent | CallStarted]) -> float:
        """Count ``events``; returns the age in seconds of the oldest (0 for none)."""
        oldest = None
        for event in events:
            if isinstance(event, CallStarted):
                moment = event.started_at
            elif isinstance(event, UsageEvent):
                self._usage(event)
                moment = event.occurred_at
            else:
                self._job(event)
                moment = event.finished_at
            if oldest is None or moment.timestamp() < oldest:
                oldest = moment.timestamp()
        return 0.0 if oldest is None else max(time.time() - oldest, 0.0)

    def _usage(self, event: UsageEvent) -> None:
        self.usage(
            (event.provider, event.model, event.key_id, event.task_type),
            event.prompt_tokens,
            event.completion_tokens,
            event.cost_usd,
        )

    def usage(
        self,
        call: tuple[str, str, str | None, str | None],
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: Decimal | None,
    ) -> None:
        """One usage row: ``call`` is its provider, model, key id and task type."""
        provider, model, key_id, task_type = call
        labels = (provider, model, key_id or "", bounded(task_type, self._task_types))
        TOKENS.labels(*labels, "prompt").inc(prompt_tokens)
        TOKENS.labels(*labels, "completion").inc(completion_tokens)
        if cost_usd is not None:
            COST.labels(*labels).inc(float(cost_usd))

    def _job(self, event: JobEvent) -> None:
        for usage in event.usage:
            self._usage(usage)
        log.debug("job %s recorded: %s", event.job_id, event.status, extra=_trace(event))
        if event.status is JobStatus.REROUTED:  # on its way to the next candidate: not an end
            return
        status = (
            event.error_code.value
            if event.error_code is not None and event.status is not JobStatus.SUCCEEDED
            else event.status.value
        )
        priority = str(event.priority)
        task = bounded(event.task_type, self._task_types)
        JOBS_FINISHED.labels(status, priority, event.provider or "", event.model or "", task).inc()
        timings = event.timings
        if timings.queued_ms is not None and timings.scheduled_ms is not None:
            JOB_WAIT.labels(priority).observe((timings.queued_ms + timings.scheduled_ms) / 1000)
        if timings.total_ms is not None:
            JOB_DURATION.labels(priority).observe(timings.total_ms / 1000)


def _trace(event: JobEvent) -> dict[str, str | None]:
    """The event's job's trace id for its log line (the accountant handles many at once)."""
    return {"trace_id": event.trace_id}

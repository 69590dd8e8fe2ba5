"""The ledger's rows and statements: what each accounting event writes, idempotently.

A call is a row in ``calls`` from its start (``CallStarted``) and a row in ``usage`` once it is
settled with what it consumed; ``call_id`` identifies both, so a redelivered event writes nothing
new and two calls of one attempt number (a job run again after its worker died) are two rows.
A job is one row in ``jobs``, replaced only by an event at least as recent, a success only by a
success.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, exists, or_, update
from sqlalchemy.dialects.postgresql import insert

from broker.core.clock import utcnow
from broker.core.db import calls, jobs, usage
from schemas import CallStarted, JobEvent, JobStatus, UsageEvent

__all__ = [
    "INSERT_CALL",
    "INSERT_USAGE",
    "SETTLE_CALLS",
    "SETTLE_STARTED_LATE",
    "UPSERT_JOB",
    "call_row",
    "latest_per_job",
    "settle_params",
    "settled_call_ids",
    "usage_id",
    "usage_row",
]


def usage_id(event: UsageEvent) -> str:
    """The call's id; an older worker's event has none and is identified as it was."""
    return event.call_id or f"{event.job_id}:{event.attempt}"


def usage_row(event: UsageEvent) -> dict[str, Any]:
    return {
        "call_id": usage_id(event),
        "job_id": event.job_id,
        "attempt": event.attempt,
        "provider": event.provider,
        "model": event.model,
        "public_model": event.public_model,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "estimated": event.estimated,
        "swept": False,
        "free": event.free,
        "cost_usd": event.cost_usd,
        "price_version": event.price_version,
        "key_id": event.key_id,
        "task_type": event.task_type,
        "consumer": event.consumer,
        "occurred_at": event.occurred_at,
    }


def call_row(event: CallStarted) -> dict[str, Any]:
    return {
        "call_id": event.call_id,
        "job_id": event.job_id,
        "attempt": event.attempt,
        "provider": event.provider,
        "model": event.model,
        "public_model": event.public_model,
        "key_id": event.key_id,
        "reservation_id": event.reservation_id,
        "reserved_prompt_tokens": event.reserved_prompt_tokens,
        "reserved_completion_tokens": event.reserved_completion_tokens,
        "reserved_cost_usd": event.reserved_cost_usd,
        "free": event.free,
        "price_version": event.price_version,
        "task_type": event.task_type,
        "consumer": event.consumer,
        "started_at": event.started_at,
        "settle_by": event.settle_by,
    }


def settled_call_ids(events: list[UsageEvent | JobEvent | CallStarted]) -> list[str]:
    """The calls these events settle: each job event's calls and each usage event's call."""
    ids: set[str] = set()
    for event in events:
        if isinstance(event, JobEvent):
            ids.update(event.call_ids)
            ids.update(usage_id(u) for u in event.usage)
        elif isinstance(event, UsageEvent):
            ids.add(usage_id(event))
    return sorted(ids)


INSERT_CALL = insert(calls).on_conflict_do_nothing(index_elements=[calls.c.call_id])

_usage_insert = insert(usage)
INSERT_USAGE = _usage_insert.on_conflict_do_update(
    constraint="usage_call_id_key",
    set_={
        c.name: _usage_insert.excluded[c.name]
        for c in usage.c
        if c.name not in ("id", "call_id", "recorded_at")
    },
    # A redelivered event changes nothing; the call's own usage replaces only the sweeper's
    # estimate (a call that outlived its settle_by: its worker was slow, not dead).
    where=usage.c.swept,
)

SETTLE_STARTED_LATE = (
    update(calls)
    .where(calls.c.call_id.in_(bindparam("ids", expanding=True)))
    .where(calls.c.settled_at.is_(None))
    .where(exists().where(usage.c.call_id == calls.c.call_id))
    .values(settled_at=bindparam("at"))
)
"""Calls whose start arrives after their usage (another accountant wrote that first): their
usage row settles them. A failed call settled out of order stays open and is swept (counted)."""

SETTLE_CALLS = (
    update(calls)
    .where(calls.c.call_id.in_(bindparam("ids", expanding=True)))
    .where(or_(calls.c.settled_at.is_(None), calls.c.swept))
    .values(settled_at=bindparam("at"), swept=False)
)


def settle_params(ids: list[str]) -> dict[str, Any]:
    return {"ids": ids, "at": utcnow()}


_SUCCEEDED = JobStatus.SUCCEEDED.value
_REROUTED = JobStatus.REROUTED.value
_job_insert = insert(jobs)
UPSERT_JOB = _job_insert.on_conflict_do_update(
    index_elements=[jobs.c.job_id],
    set_={
        c.name: _job_insert.excluded[c.name]
        for c in jobs.c
        if c.name not in ("job_id", "recorded_at")
    },
    # A later event replaces the row, except that nothing replaces a success: a job delivered
    # again after it succeeded (its ack lost) may end expired or failed the second time. A
    # failover's "rerouted" is a passing state: the job's end replaces it whatever the two
    # hosts' clocks say, and it never replaces an end.
    where=((jobs.c.finished_at <= _job_insert.excluded.finished_at) | (jobs.c.status == _REROUTED))
    & ((jobs.c.status == _REROUTED) | (_job_insert.excluded.status != _REROUTED))
    & ((jobs.c.status != _SUCCEEDED) | (_job_insert.excluded.status == _SUCCEEDED)),
)


def _replaces(event: JobEvent, held: JobEvent) -> bool:
    """``UPSERT_JOB``'s rule, for two events of one job in one batch."""
    rerouted = JobStatus.REROUTED
    if event.status is rerouted and held.status is not rerouted:
        return False
    if held.status is JobStatus.SUCCEEDED and event.status is not JobStatus.SUCCEEDED:
        return False
    return held.status is rerouted or held.finished_at <= event.finished_at


def latest_per_job(events: list[JobEvent]) -> list[dict[str, Any]]:
    """One row per job (Postgres refuses two conflicting rows in one upsert): the latest."""
    latest: dict[str, JobEvent] = {}
    for event in events:
        held = latest.get(event.job_id)
        if held is None or _replaces(event, held):
            latest[event.job_id] = event
    return [
        {
            "job_id": e.job_id,
            "status": e.status.value,
            "priority": e.priority,
            "public_model": e.public_model,
            "provider": e.provider,
            "model": e.model,
            "error_code": e.error_code.value if e.error_code else None,
            "attempts": e.attempts,
            "prompt_tokens": e.prompt_tokens,
            "completion_tokens": e.completion_tokens,
            "queued_ms": e.timings.queued_ms,
            "scheduled_ms": e.timings.scheduled_ms,
            "provider_ms": e.timings.provider_ms,
            "total_ms": e.timings.total_ms,
            "batch_id": e.batch_id,
            "key_id": e.key_id,
            "submitted_at": e.submitted_at,
            "finished_at": e.finished_at,
        }
        for e in latest.values()
    ]

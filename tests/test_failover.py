"""Failover through the real pipeline: a job its provider fails goes back to the scheduler and on
to a candidate it has not tried, under a new quota reservation, and the result lists every
attempt; with no candidate left it ends failed with its provider's error."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from broker.accounting.accountant import Accountant
from broker.client import SwitchyardClient, make_job
from broker.core.config import CircuitConfig, load_config
from broker.core.db import make_engine
from broker.core.names import Names
from broker.core.windows import Period, window
from broker.state.circuits import Circuits
from broker.state.quota import Bucket, QuotaStore, Reserved
from schemas import Attempt, JobEvent, JobResult, JobStatus, Route
from tests.conftest import (
    AMQP_URL,
    MockProvider,
    cheap_then_dear,
    dead_provider,
    eventually,
    queue_depth,
    write_config,
)

SECRET = "sk-failover-test-key"
KEYS = [
    {
        "id": "team",
        "key_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
        "budgets": {"tokens_per_day": 100_000},
    }
]


@pytest.fixture(autouse=True)
def _fresh(fresh_views: None) -> None:
    """Every test here reads the circuits on each use."""


async def reserve_one_request(redis: Redis, names: Names, provider: str, reservation: str) -> str:
    """Hold ``reservation`` on a request counter of ``provider``; returns the counter's key."""
    counter = names.quota_bucket("provider", provider, "rpm", "test")
    bucket = Bucket(counter, "requests", 1, 10, time.time() + 600, f"{provider} requests/minute")
    assert isinstance(await QuotaStore(redis, names).reserve(reservation, [bucket], 600), Reserved)
    return counter


def in_flight(mock: MockProvider, calls: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(mock.stats()["in_flight"] == calls)

    return check


def attempts(result: JobResult) -> list[tuple[int, str, str, str | None]]:
    return [(a.number, a.provider, a.status, a.error_code) for a in result.attempts]


async def complete(names: Names, **fields: Any) -> JobResult:
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        job = make_job([{"role": "user", "content": "which way?"}], model="m")
        return await client.complete(job=job, timeout_s=30, **fields)


async def test_a_job_its_provider_fails_is_served_by_the_next_candidate_under_a_new_reservation(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis: Redis,
    pg: asyncpg.Connection,
) -> None:
    down = dead_provider("down", max_attempts=2, circuit={"failures": 100})
    config = cheap_then_dear(tmp_path, mock, down, "up", keys=KEYS)
    async with pipeline(config):
        result = await complete(names, api_key=SECRET)

        assert result.status.value == "succeeded" and result.provider == "up"
        assert attempts(result) == [
            (1, "down", "failed", "server_error"),
            (2, "down", "failed", "server_error"),
            (3, "up", "succeeded", None),
        ]
        assert result.usage is not None
        used = result.usage.total_tokens
        day = window(Period.DAY, datetime.now(UTC), config.zone).id
        counters = {
            "down": names.quota_bucket("provider", "down", "tokens_day", day),
            "up": names.quota_bucket("provider", "up", "tokens_day", day),
            "key": names.quota_bucket("key", "team", "tokens_day", day),
        }

        async def settled() -> bool:
            values = {k: int(await redis.get(v) or 0) for k, v in counters.items()}
            # down's reservation gave its tokens back; up's and the key's hold what was used.
            return values == {"down": 0, "up": used, "key": used}

        await eventually(settled, 10, "both reservations settled by the accountant")

        async def recorded() -> bool:
            row = await pg.fetchrow("SELECT * FROM jobs WHERE job_id = $1", result.job_id)
            return row is not None and row["status"] == "succeeded"

        await eventually(recorded, 10, "the job's final row")
    row = await pg.fetchrow("SELECT * FROM jobs WHERE job_id = $1", result.job_id)
    assert (row["provider"], row["attempts"]) == ("up", 3)
    usage = await pg.fetch("SELECT attempt, provider FROM usage WHERE job_id = $1", result.job_id)
    assert [(u["attempt"], u["provider"]) for u in usage] == [(3, "up")]


async def test_jobs_an_open_circuit_refuses_go_on_to_the_next_candidate(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis: Redis,
    amqp: AbstractRobustConnection,
) -> None:
    """Routed to ``first`` while its circuit was closed; it opened while the job waited."""
    config = cheap_then_dear(tmp_path, mock, {"id": "first", "concurrency": 1}, "second")
    mock.configure(latency_ms=1500)
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        jobs = [make_job([{"role": "user", "content": f"q{i}"}], model="m") for i in range(2)]
        async with pipeline(config, workers=[], accountant=False):  # both routed to "first"
            pending = [asyncio.create_task(client.complete(job=j, timeout_s=30)) for j in jobs]

            async def both_queued() -> bool:
                return await queue_depth(amqp, names.provider("first")) == 2

            await eventually(both_queued, 10, "both jobs in first's queue")
        async with pipeline(config):
            # The one call slot at "first" is busy for 1.5 s ...
            await eventually(in_flight(mock, 1), 10, "the first job's call")
            # ... while its circuit opens: the job that did not start yet is refused.
            await Circuits(redis, names).failed("first", CircuitConfig(failures=1, open_s=60))
            results = await asyncio.gather(*pending)
    by_provider = sorted((r.provider, attempts(r)) for r in results)
    assert by_provider == [
        ("first", [(1, "first", "succeeded", None)]),
        (
            "second",
            [(1, "first", "failed", "provider_unavailable"), (2, "second", "succeeded", None)],
        ),
    ]


async def test_with_no_candidate_left_the_job_ends_failed_with_its_providers_error(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider, redis: Redis
) -> None:
    """``backup`` could take the job when it was routed, and its circuit opened during the call."""
    config = cheap_then_dear(tmp_path, mock, {"id": "main", "max_attempts": 1}, "backup")
    mock.configure(latency_ms=1000, fail_next={"kind": "server_error", "count": 1})
    async with pipeline(config):
        pending = asyncio.create_task(complete(names))
        await eventually(in_flight(mock, 1), 10, "the call at main")
        await Circuits(redis, names).failed("backup", CircuitConfig(failures=1, open_s=60))
        result = await pending
    assert result.status.value == "failed" and result.error is not None
    assert (result.error.code.value, result.error.provider) == ("server_error", "main")
    assert "no other provider could take it" in result.error.message
    assert "backup/m: circuit open" in result.error.message
    assert result.error.retry_after is not None and 0 < result.error.retry_after <= 60
    assert attempts(result) == [(1, "main", "failed", "server_error")]
    assert mock.stats()["calls"] == 1


@pytest.mark.parametrize(
    ("reservation_calls", "state", "requests"),
    [(0, b"released", 0), (None, b"reconciled", 1), (1, b"reconciled", 1)],
)
async def test_a_reservation_is_given_back_whole_only_if_its_own_provider_was_not_called(
    reservation_calls: int | None,
    state: bytes,
    requests: int,
    names: Names,
    tmp_path: Path,
    mock: MockProvider,
    pipeline: Any,
    redis: Redis,
    amqp: Any,
) -> None:
    """A failed-over job's last provider may refuse it (an open circuit) after others were
    called: its event counts calls, and the reservation must not keep a request for a call that
    was never made."""
    job_id = f"{names.namespace}-job-1"  # the session's jobs table is shared by its tests
    reservation = f"{job_id}:2:x"
    counter = await reserve_one_request(redis, names, "last", reservation)
    event = JobEvent(
        job_id=job_id,
        status=JobStatus.FAILED,
        attempts=2,  # made at the providers before the last one
        reservation_calls=reservation_calls,
        reservation_id=reservation,
        finished_at=datetime.now(UTC),
    )
    limited = [{"id": "last", "rpm": 10}]  # a limit: the accountant reconciles reservations
    config = load_config(write_config(tmp_path / "p.yaml", mock, limited))
    async with pipeline(config, scheduler=False, workers=[]):
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(event.model_dump_json().encode()), routing_key=names.usage
        )
        await channel.close()

        async def settled() -> bool:
            return await redis.hget(names.redis_key("reservation", reservation), "state") == state

        await eventually(settled, 10, f"the reservation {state.decode()}")
    assert int(await redis.get(counter) or 0) == requests


async def test_a_failed_over_jobs_end_replaces_its_rerouted_row_whatever_the_clocks(
    names: Names, database_url: str, config: Any, pg: asyncpg.Connection
) -> None:
    """The rerouted event comes from one host, the end from another: a clock ahead on the
    first kept the row at "rerouted" for good. A rerouted event never replaces an end."""
    writer = Accountant("amqp://unused", database_url, config, names)
    writer._engine = make_engine(database_url)
    later, earlier = datetime.now(UTC), datetime.now(UTC) - timedelta(seconds=1)

    def event(job_id: str, status: JobStatus, at: datetime) -> JobEvent:
        return JobEvent(job_id=job_id, status=status, finished_at=at)

    a, b, c = (f"{names.namespace}-{x}" for x in "abc")
    try:
        await writer._write([event(a, JobStatus.REROUTED, later)])  # separate transactions
        await writer._write([event(a, JobStatus.SUCCEEDED, earlier)])
        await writer._write(  # in one batch
            [event(b, JobStatus.REROUTED, later), event(b, JobStatus.FAILED, earlier)]
        )
        await writer._write([event(c, JobStatus.FAILED, earlier)])
        await writer._write([event(c, JobStatus.REROUTED, later)])  # a stale one, redelivered
    finally:
        await writer._engine.dispose()
    rows = await pg.fetch("SELECT job_id, status FROM jobs WHERE job_id = ANY($1)", [a, b, c])
    assert {r["job_id"]: r["status"] for r in rows} == {a: "succeeded", b: "failed", c: "failed"}


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"route_key": None}, "rejected", "unauthorized"),  # forged: no key where keys are on
        ({"deadline_s": -1}, "expired", "deadline_exceeded"),
    ],
)
async def test_a_rerouted_job_the_scheduler_cannot_take_ends_with_its_attempts_and_no_refund(
    changes: dict[str, Any],
    status: str,
    code: str,
    names: Names,
    tmp_path: Path,
    mock: MockProvider,
    pipeline: Any,
    redis: Redis,
    amqp: Any,
    pg: asyncpg.Connection,
) -> None:
    """Such a job ended through the generic rejection, whose event released the reservation
    the failed provider's worker settles (refunding the request it was called with), and whose
    result dropped the attempts; a rerouted job without a key was routed keyless."""
    config = cheap_then_dear(tmp_path, mock, dead_provider("a"), "b", keys=KEYS)
    counter = await reserve_one_request(redis, names, "a", "r-a")
    now = datetime.now(UTC)
    job = make_job([{"role": "user", "content": "q"}], model="m").model_copy(
        update={
            "deadline": now + timedelta(seconds=changes.get("deadline_s", 60)),
            "route": Route(
                provider="a",
                model="m",
                public_model="m",
                reason="test",
                alternatives=["b"],
                scheduled_at=now,
                reservation_id="r-a",
                key_id=changes.get("route_key", "team"),
            ),
            "attempts": [
                Attempt(
                    number=1,
                    provider="a",
                    model="m",
                    status="failed",
                    error_code="server_error",
                    duration_ms=1,
                )
            ],
        }
    )
    channel = await amqp.channel()
    results = await channel.declare_queue(f"{names.namespace}.reroute-results", exclusive=True)
    async with pipeline(config, workers=[]), results.iterator(timeout=30) as messages:
        await channel.default_exchange.publish(
            aio_pika.Message(job.model_dump_json().encode(), reply_to=results.name),
            routing_key=names.reroute,
        )
        async for message in messages:
            await message.ack()
            result = JobResult.model_validate_json(message.body)
            break

        async def recorded() -> bool:  # the accountant has handled the job's event
            return await pg.fetchval("SELECT 1 FROM jobs WHERE job_id = $1", job.job_id) == 1

        await eventually(recorded, 10, "the job's row")
    await channel.close()
    assert result.status.value == status and result.error is not None
    assert result.error.code.value == code
    assert attempts(result) == [(1, "a", "failed", "server_error")]
    assert await redis.hget(names.redis_key("reservation", "r-a"), "state") == b"held"
    assert int(await redis.get(counter) or 0) == 1

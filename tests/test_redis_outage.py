"""Redis stopped under a running pipeline whose config sets limits: persistent (batch) jobs wait
and are all served once it returns; RPC jobs are answered ``unavailable`` with ``retry_after`` at
once. Neither is an ``internal_error`` or a dead letter. Redis is always started again."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from broker.client import SwitchyardClient, make_job
from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.config import load_config
from broker.core.names import HEADER_DEAD_CODE, Names
from broker.core.windows import Period, window
from schemas import ErrorCode, JobResult, JobStatus
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    MockProvider,
    eventually,
    queue_depth,
    write_config,
)

MESSAGES = [{"role": "user", "content": "wait for Redis"}]
LOCAL_REDIS = ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379")
REDIS_SERVER = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1"]
REDIS_SERVER += ["--port", "6379", "--save", "", "--appendonly", "no"]


async def _answers(redis: Redis) -> bool:
    try:
        return bool(await redis.ping())
    except Exception:
        return False


@pytest.fixture
async def redis_outage() -> AsyncIterator[list[str]]:
    """Append "stopped" once the test stops Redis; it is started again at the end, and waited
    for, whatever happened."""
    if REDIS_URL.rstrip("/") not in LOCAL_REDIS or not shutil.which("redis-server"):
        pytest.skip("stops and starts the local Redis: needs redis-server at 127.0.0.1:6379")
    stopped: list[str] = []
    probe = Redis.from_url(REDIS_URL)
    try:
        yield stopped
    finally:
        if stopped or not await _answers(probe):
            await asyncio.to_thread(subprocess.run, REDIS_SERVER, check=True, timeout=30)
        await eventually(lambda: _answers(probe), 30, "Redis to answer again")
        await probe.aclose()


async def test_while_redis_is_away_batch_jobs_wait_and_rpc_jobs_are_told_to_retry(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis_outage: list[str],
) -> None:
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "mock", "rpm": 100_000}]))
    assert config.needs_quota
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            queue = await client.open_results("redis-outage")
            before = await client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=30)
            assert before.status is JobStatus.SUCCEEDED

            redis_outage.append("stopped")
            await asyncio.to_thread(
                subprocess.run, ["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30
            )
            probe = Redis.from_url(REDIS_URL)
            assert not await _answers(probe)
            batch = [make_job(MESSAGES, model="gpt-4o-mini") for _ in range(40)]
            for job in batch:
                await client.submit(job, results_queue=queue)
            # A transient job no one waits for (no reply_to): its answer has nowhere to go.
            orphan = make_job(MESSAGES, model="gpt-4o-mini")
            channel = await amqp.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(encode(orphan), message_id=orphan.job_id), routing_key=names.jobs
            )
            rpc = await asyncio.gather(
                *(client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=20) for _ in range(5))
            )
            for result in rpc:
                assert result.status is JobStatus.FAILED
                assert result.error is not None and result.error.code is ErrorCode.UNAVAILABLE
                assert result.error.retry_after is not None and result.error.retry_after > 0
            await asyncio.sleep(2)  # the batch waits meanwhile; nothing of it has run
            assert mock.stats()["calls"] == 1

            await asyncio.to_thread(subprocess.run, REDIS_SERVER, check=True, timeout=30)
            await eventually(lambda: _answers(probe), 30, "Redis to answer again")
            redis_outage.clear()
            await probe.aclose()

            got: dict[str, JobResult] = {}
            async with asyncio.timeout(90):
                async for result in client.results(queue):
                    got[result.job_id] = result
                    if len(got) == len(batch):
                        break
            await client.delete_results(queue)
    assert {j.job_id for j in batch} == set(got)
    assert {r.status for r in got.values()} == {JobStatus.SUCCEEDED}
    # A job told to retry was never a bad message: only the one with no caller to tell is
    # dead-lettered, so its body is not lost.
    dead = await (await channel.declare_queue(names.dead, passive=True)).get(timeout=5)
    assert dead is not None and dead.message_id == orphan.job_id
    assert dead.headers[HEADER_DEAD_CODE] == "unavailable"
    await dead.ack()
    assert await queue_depth(amqp, names.dead) == 0
    await channel.close()


async def test_a_budget_spent_before_redis_restarts_empty_is_still_enforced_after(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    pg: asyncpg.Connection,
    redis: Redis,
    redis_outage: list[str],
) -> None:
    """Redis keeps nothing on disk here: restarted, it has no counters and no quota epoch. The
    scheduler rebuilds the counters from the ledger before it admits again, so the spent budget
    stays spent (it used to start again from zero)."""
    secret = f"sk-{names.namespace}"
    key_id = f"k-{names.namespace.replace('.', '-')}"  # the ledger is the session's: own ids
    key = {
        "id": key_id,
        "key_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "budgets": {"tokens_per_day": 400},
    }
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "mock"}], keys=[key]))
    counter = names.quota_bucket(
        "key", key_id, "tokens_day", window(Period.DAY, utcnow(), config.zone).id
    )
    ask = {"model": "gpt-4o-mini", "params": {"max_tokens": 40}, "api_key": secret}

    async def spent() -> int:
        sql = "SELECT coalesce(sum(total_tokens), 0) FROM usage WHERE key_id = $1"
        return int(await pg.fetchval(sql, key_id))

    async def settled() -> bool:
        """Every served call is in the ledger and the counter holds exactly that."""
        value = await redis.get(counter)
        return value is not None and int(value) == await spent() > 0

    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            # Spend the budget: a refusal may be for reservations not yet settled, so settle
            # them and ask again, until a job is refused with nothing in flight.
            for _ in range(40):
                result = await client.complete(MESSAGES, **ask)
                if result.status is JobStatus.SUCCEEDED:
                    continue
                assert result.error is not None and result.error.code is ErrorCode.RATE_LIMITED
                await eventually(settled, 20, "the served calls settled")
                result = await client.complete(MESSAGES, **ask)
                if result.status is not JobStatus.SUCCEEDED:
                    break
            else:
                raise AssertionError("the budget never ran out")
            used = await spent()
            assert used > 400 - 60  # what is left is less than one more job's reservation

            redis_outage.append("stopped")
            await asyncio.to_thread(
                subprocess.run, ["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30
            )
            await asyncio.to_thread(subprocess.run, REDIS_SERVER, check=True, timeout=30)
            probe = Redis.from_url(REDIS_URL)
            await eventually(lambda: _answers(probe), 30, "Redis to answer again")
            redis_outage.clear()
            assert await probe.get(names.quota_epoch) is None  # it came back empty
            await probe.aclose()

            after = await client.complete(MESSAGES, **ask)
    assert after.error is not None and after.error.code is ErrorCode.RATE_LIMITED
    assert f"has {used} of 400 used" in after.error.message
    assert mock.stats()["calls"] == await pg.fetchval(
        "SELECT count(*) FROM usage WHERE key_id = $1", key_id
    )


async def test_with_redis_away_a_global_cap_holds_batch_jobs_and_answers_rpc_jobs_retry(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis_outage: list[str],
) -> None:
    """A provider with a global concurrency cap needs Redis for its leases. While Redis is
    away, a batch job waits in its worker and runs once Redis is back; an RPC job is answered
    ``unavailable`` with ``retry_after`` at once (both used to end ``internal_error``)."""
    provider = {"id": "mock", "global_concurrency": 2}
    config = load_config(write_config(tmp_path / "p.yaml", mock, [provider]))
    assert not config.needs_quota  # the scheduler admits without Redis; only the lease needs it
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            queue = await client.open_results("lease-outage")
            redis_outage.append("stopped")
            await asyncio.to_thread(
                subprocess.run, ["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=30
            )
            batch = [make_job(MESSAGES, model="gpt-4o-mini") for _ in range(4)]
            for job in batch:
                await client.submit(job, results_queue=queue)
            rpc = await client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=20)
            assert rpc.status is JobStatus.FAILED
            assert rpc.error is not None and rpc.error.code is ErrorCode.UNAVAILABLE
            assert rpc.error.retry_after is not None and rpc.error.retry_after > 0
            await asyncio.sleep(1)
            assert mock.stats()["calls"] == 0  # no call went without its lease

            await asyncio.to_thread(subprocess.run, REDIS_SERVER, check=True, timeout=30)
            probe = Redis.from_url(REDIS_URL)
            await eventually(lambda: _answers(probe), 30, "Redis to answer again")
            await probe.aclose()
            redis_outage.clear()
            got: dict[str, JobResult] = {}
            async with asyncio.timeout(60):
                async for result in client.results(queue):
                    got[result.job_id] = result
                    if len(got) == len(batch):
                        break
            await client.delete_results(queue)
    assert {r.status for r in got.values()} == {JobStatus.SUCCEEDED}
    assert mock.stats()["calls"] == len(batch)


async def test_failing_open_runs_jobs_while_redis_is_away_and_counts_them_when_it_returns(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    pg: asyncpg.Connection,
    redis: Redis,
) -> None:
    """``quota_when_redis_away: admit``: while Redis does not answer (paused here, so it keeps
    its counters), an RPC job is served rather than told to retry; once Redis answers, the
    scheduler charges it to its counters at its estimate."""
    secret = f"sk-{names.namespace}"
    key_id = f"k-{names.namespace.replace('.', '-')}"
    key = {
        "id": key_id,
        "key_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "budgets": {"tokens_per_day": 100_000},
    }
    path = write_config(
        tmp_path / "p.yaml", mock, [{"id": "mock"}], keys=[key], quota_when_redis_away="admit"
    )
    config = load_config(path)
    counter = names.quota_bucket(
        "key", key_id, "tokens_day", window(Period.DAY, utcnow(), config.zone).id
    )
    ask = {"model": "gpt-4o-mini", "params": {"max_tokens": 40}, "api_key": secret}

    async def count() -> int:
        return int(await redis.get(counter) or 0)

    async def used() -> int:
        sql = "SELECT coalesce(sum(total_tokens), 0) FROM usage WHERE key_id = $1"
        return int(await pg.fetchval(sql, key_id))

    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            first = await client.complete(MESSAGES, **ask)
            assert first.status is JobStatus.SUCCEEDED
            await eventually(lambda: _equal(count, used), 20, "the first job settled")
            before = await count()
            # Every client's commands wait 6 s: the scheduler's time out after 2 s.
            await redis.execute_command("CLIENT", "PAUSE", "6000", "ALL")
            unmetered = await client.complete(MESSAGES, **ask, timeout_s=30)
            assert unmetered.status is JobStatus.SUCCEEDED, unmetered.error
            assert unmetered.usage is not None

            async def counted() -> bool:
                return await count() > before

            await eventually(counted, 30, "the unmetered job counted once Redis answers")
    # Counted at its estimate (prompt + its 40-token cap), never below what it used.
    assert await count() - before >= unmetered.usage.total_tokens
    assert await count() - before <= unmetered.usage.prompt_tokens * 2 + 40


async def _equal(a: Any, b: Any) -> bool:
    return bool(await a() == await b())

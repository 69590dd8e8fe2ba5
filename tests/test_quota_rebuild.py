"""Quota counters rebuilt from the ledger (``broker.state.quota_rebuild``): each live counter
rises to the spend Postgres records in its window, settled calls at their usage and calls in
flight at their reservation; a counter already higher stays; Redis gets an epoch once."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.client import SwitchyardClient, make_job
from broker.core.clock import utcnow
from broker.core.config import Config, load_config
from broker.core.db import make_engine
from broker.core.names import Names
from broker.core.pricing import usd_to_nanos
from broker.core.quota_plan import all_limits
from broker.core.windows import Period, window
from broker.state.quota import Bucket, QuotaStateLost, QuotaStore, Reserved
from broker.state.quota_rebuild import QuotaRebuilder
from tests.conftest import AMQP_URL, MockProvider, eventually, queue_depth, write_config

SHA = hashlib.sha256(b"sk-rebuild").hexdigest()


def _id(names: Names) -> str:
    """The namespace as an id the config accepts."""
    return names.namespace.replace(".", "-").lower()


@pytest.fixture
def config(tmp_path: Path, mock: MockProvider, names: Names) -> Config:
    """Key ``team-a`` and provider ``p1`` under ids of this test's own (the session's ledger
    holds other tests' calls)."""
    keys = [
        {
            "id": f"team-a-{_id(names)}",
            "key_sha256": SHA,
            "consumer": "research",
            "rpm": 100,
            "budgets": {"tokens_per_day": 100_000, "usd_per_day": "1"},
        }
    ]
    consumers = {"research": {"budgets": {"usd_per_month": "10"}}}
    providers = [
        {"id": f"p1-{_id(names)}", "models": {"m": {"input": 1, "output": 2, "tpm": 50_000}}}
    ]
    path = write_config(tmp_path / "q.yaml", mock, providers, keys=keys, consumers=consumers)
    return load_config(path)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


async def ledger(pg: asyncpg.Connection, names: Names, job: str, **row: Any) -> None:
    """One call of key ``team-a`` (or ``key_id``) on ``p1``: a calls row, and a usage row if it
    ``used`` something (settled)."""
    now = utcnow()
    key_id = row.get("key_id", f"team-a-{_id(names)}")
    provider = f"p1-{_id(names)}"
    call_id = f"{job}:1:x"
    await pg.execute(
        "INSERT INTO calls (call_id, job_id, attempt, provider, model, public_model, key_id,"
        " reservation_id, reserved_prompt_tokens, reserved_completion_tokens, reserved_cost_usd,"
        " started_at, settle_by, settled_at) VALUES ($1, $2, 1, $11, 'm', 'm', $3, $4, $5, $6,"
        " $7, $8, $9, $10)",
        call_id,
        job,
        key_id,
        f"{job}:0:r",
        row["reserved"][0],
        row["reserved"][1],
        row["reserved"][2],
        now - timedelta(seconds=1),
        now + timedelta(seconds=60),
        now if "used" in row else None,
        provider,
    )
    if "used" in row:
        prompt, completion, cost = row["used"]
        await pg.execute(
            "INSERT INTO usage (call_id, job_id, attempt, provider, model, public_model,"
            " prompt_tokens, completion_tokens, total_tokens, cost_usd, key_id, occurred_at)"
            " VALUES ($1, $2, 1, $9, 'm', 'm', $3, $4, $5, $6, $7, $8)",
            call_id,
            job,
            prompt,
            completion,
            prompt + completion,
            cost,
            key_id,
            now - timedelta(seconds=1),
            provider,
        )


async def test_counters_rise_to_the_ledger_and_reservations_wait_for_the_epoch(
    config: Config, engine: AsyncEngine, redis: Redis, names: Names, pg: asyncpg.Connection
) -> None:
    ns = names.namespace
    team, provider = f"team-a-{_id(names)}", f"p1-{_id(names)}"
    # Two settled calls and one in flight for team-a, one settled call of another key.
    spent = (Decimal("0.00016"), Decimal("0.00005"), Decimal("0.00045"))
    await ledger(pg, names, f"{ns}-1", reserved=(50, 200, spent[2]), used=(40, 60, spent[0]))
    await ledger(pg, names, f"{ns}-2", reserved=(50, 200, spent[2]), used=(30, 10, spent[1]))
    await ledger(pg, names, f"{ns}-3", reserved=(50, 200, spent[2]))
    other = (9, 9, Decimal("0.000027"))
    await ledger(pg, names, f"{ns}-4", key_id=f"other-{ns}", reserved=other, used=other)
    await redis.delete(names.quota_epoch)  # as Redis restarted empty
    store = QuotaStore(redis, names)
    now = utcnow()
    rpm = names.quota_bucket("key", team, "rpm", "x")
    bucket = Bucket(rpm, "requests", 1, 5, now.timestamp() + 60, "key team-a rpm")
    with pytest.raises(QuotaStateLost):  # no epoch: Redis has lost its counters
        await store.reserve("r1", [bucket], 60)

    rebuilder = QuotaRebuilder(engine, redis, names, config)
    store.on_lost = rebuilder.ensure
    assert isinstance(await store.reserve("r1", [bucket], 60), Reserved)  # rebuilt first
    epoch = await store.epoch()
    assert epoch is not None

    keys = {
        (limit.scope, limit.scope_id, limit.metric): limit.key(
            names, limit.window(now, config.zone)
        )
        for limit in all_limits(config)
    }
    counters = {scope: await store.usage(key) for scope, key in keys.items()}
    team_usd = usd_to_nanos(sum(spent, Decimal(0)))
    # team-a: settled 100 + 40 tokens, in flight 250 as reserved; money likewise.
    assert counters[("key", team, "tokens_day")] == 100 + 40 + 250
    assert counters[("key", team, "usd_nanos_day")] == team_usd
    assert counters[("key", team, "rpm")] == 3  # three reservations made calls
    assert counters[("consumer", "research", "usd_nanos_month")] == team_usd
    # The provider and the model count every key's calls.
    assert counters[("provider", provider, "tokens_day")] == 100 + 40 + 250 + 18
    assert counters[("model", f"{provider}/m", "tpm")] == 100 + 40 + 250 + 18

    # Again: a counter above the ledger (live reservations) is not lowered; the epoch stays.
    tokens_day = keys[("key", team, "tokens_day")]
    await redis.set(tokens_day, 10_000, keepttl=True)
    await redis.delete(keys[("key", team, "usd_nanos_day")])
    await rebuilder.rebuild()
    assert await store.usage(tokens_day) == 10_000
    assert await store.usage(keys[("key", team, "usd_nanos_day")]) == team_usd
    assert await store.epoch() == epoch


async def test_a_job_queued_when_redis_lost_its_reservation_is_admitted_again(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    pg: asyncpg.Connection,
    redis: Redis,
    amqp: AbstractRobustConnection,
) -> None:
    """A batch job reserved and waiting in its provider's queue when Redis lost everything:
    the rebuild cannot see its reservation (no call yet), so its worker, finding another epoch,
    sends it back and the scheduler admits it again; its spend then reaches the counters (it
    used to run unmetered: its reconcile found no reservation)."""
    secret = f"sk-{names.namespace}"
    key_id = f"k-{_id(names)}"
    key = {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}
    key["budgets"] = {"tokens_per_day": 100_000}  # type: ignore[assignment]
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "mock"}], keys=[key]))
    counter = names.quota_bucket(
        "key", key_id, "tokens_day", window(Period.DAY, utcnow(), config.zone).id
    )
    job = make_job([{"role": "user", "content": "queued"}], model="gpt-4o-mini")
    job.params.max_tokens = 40
    async with pipeline(config, workers=[]):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            results = await client.open_results("queued")
            await client.submit(job, results_queue=results, api_key=secret)

            async def queued() -> bool:
                lanes = [names.provider("mock", lane) for lane in range(config.fair_lanes)]
                return sum([await queue_depth(amqp, lane) for lane in lanes]) == 1

            await eventually(queued, 20, "the job reserved and queued for its worker")
            first_epoch = await redis.get(names.quota_epoch)
            async for stale in redis.scan_iter(match=f"{names.namespace}:*"):
                await redis.delete(stale)  # as Redis restarted empty
            async with pipeline(config, scheduler=False, accountant=False, workers=["mock"]):
                async with asyncio.timeout(30):
                    result = await anext(aiter(client.results(results)))
    assert result.status.value == "succeeded" and result.usage is not None
    assert await redis.get(names.quota_epoch) not in (None, first_epoch)  # rebuilt

    async def charged() -> bool:
        return int(await redis.get(counter) or 0) == result.usage.total_tokens  # type: ignore[union-attr]

    await eventually(charged, 20, "the job's tokens on its key's counter")
    assert mock.stats()["calls"] == 1

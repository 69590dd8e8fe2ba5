"""Quota before any provider call, through the real pipeline: keys, limits that never overshoot,
budgets reconciled exactly, free tier then paid, parked jobs, returned reservations."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

import broker.scheduler.service as scheduler_module
from broker.client import SwitchyardClient, make_job
from broker.core.config import ProviderType, load_config
from broker.core.names import HEADER_KEY, Names
from broker.core.tokens import estimate_prompt_tokens
from broker.core.windows import Period, window
from broker.scheduler.admission import MIN_OUTPUT_TOKENS
from mock_provider.answers import count_tokens, expected_completion, prompt_tokens
from schemas import ChatMessage, JobResult
from tests.conftest import (
    AMQP_URL,
    MockProvider,
    consumer_count,
    eventually,
    process_env,
    write_config,
)
from tests.test_processes import Processes

SECRET = "sk-switchyard-test-key"
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()
PRICE = {"input": 1000, "output": 1000}  # USD per million tokens: a job costs cents


def key_entry(**limits: Any) -> dict[str, Any]:
    return {"id": "team-a", "key_sha256": SECRET_SHA, **limits}


async def run_jobs(
    names: Names,
    count: int,
    *,
    api_key: str | None = SECRET,
    concurrent: bool = True,
    **fields: Any,
) -> list[JobResult]:
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:

        async def one(i: int) -> JobResult:
            job = make_job(
                [{"role": "user", "content": f"budget question {i}"}], model="m", **fields
            )
            return await client.complete(job=job, api_key=api_key, timeout_s=60)

        if concurrent:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        return [await one(i) for i in range(count)]


async def test_a_job_without_a_known_key_is_unauthorized(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    providers = [{"id": "p", "models": {"m": PRICE}}]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry()]))
    async with pipeline(config, accountant=False):
        [missing] = await run_jobs(names, 1, api_key=None)
        [wrong] = await run_jobs(names, 1, api_key="sk-not-ours")
        [good] = await run_jobs(names, 1)
    for result in (missing, wrong):
        assert result.status.value == "rejected"
        assert result.error is not None and result.error.code.value == "unauthorized"
        assert SECRET not in result.error.message
    assert good.status.value == "succeeded"
    assert mock.stats()["calls"] == 1


async def test_two_scheduler_processes_admit_exactly_the_keys_requests_per_minute(
    amqp: AbstractRobustConnection,
    names: Names,
    database_url: str,
    tmp_path: Path,
    mock: MockProvider,
) -> None:
    providers = [{"id": "p", "concurrency": 50, "models": {"m": PRICE}}]
    path = write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(rpm=100)])
    procs = Processes(process_env(names, database_url, path), tmp_path)
    try:
        procs.start("scheduler")
        procs.start("scheduler")
        procs.start("worker", "--provider", "p")

        async def up() -> bool:
            return (
                await consumer_count(amqp, names.jobs) == 2
                and await consumer_count(amqp, names.provider("p")) == 1
            )

        await eventually(up, 30, "two schedulers and a worker")
        # All 500 must land in one minute window: start early in a minute.
        seconds_left = 60 - time.time() % 60
        if seconds_left < 30:
            await asyncio.sleep(seconds_left + 0.1)
        results = await run_jobs(names, 500)
    finally:
        procs.stop_all()
    outcomes = Counter((r.status.value, r.error.code.value if r.error else None) for r in results)
    assert outcomes == {("succeeded", None): 100, ("rejected", "rate_limited"): 400}
    rejected = [r for r in results if r.error is not None]
    assert all(r.error and r.error.retry_after and 0 < r.error.retry_after <= 60 for r in rejected)
    assert mock.stats()["calls"] == 100


async def test_a_usd_day_budget_stops_the_job_that_would_cross_it_and_reconciles_exactly(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    redis: Redis,
    mock: MockProvider,
) -> None:
    providers = [{"id": "p", "models": {"m": PRICE}}]
    budget = Decimal("0.25")  # each job reserves ~0.07 USD (prompt + 50 output tokens)
    config = load_config(
        write_config(
            tmp_path / "p.yaml",
            mock,
            providers,
            keys=[key_entry(budgets={"usd_per_day": str(budget)})],
        )
    )
    async with pipeline(config):
        results = await run_jobs(names, 12, concurrent=False, params={"max_tokens": 50})
        statuses = [r.status.value for r in results]
        assert "rejected" in statuses
        first_rejected = statuses.index("rejected")
        assert statuses[:first_rejected] == ["succeeded"] * first_rejected
        rejected = results[first_rejected]
        assert rejected.error is not None
        assert rejected.error.code.value == "rate_limited"
        assert "key team-a USD per day has $" in rejected.error.message
        assert rejected.error.message.endswith(" of $0.25 used")  # money in dollars, not units
        succeeded = [r for r in results if r.status.value == "succeeded"]
        spent = sum((r.cost_usd or Decimal(0) for r in succeeded), Decimal(0))
        assert spent <= budget
        assert mock.stats()["calls"] == len(succeeded)

        day = window(Period.DAY, datetime.now(UTC), ZoneInfo("UTC")).id
        usd_key = names.quota_bucket("key", "team-a", "usd_nanos_day", day)
        tokens_key = names.quota_bucket("provider", "p", "tokens_day", day)
        ids = [r.job_id for r in succeeded]

        async def reconciled() -> bool:
            rows = await pg.fetch(
                "SELECT cost_usd, total_tokens FROM usage WHERE job_id = ANY($1::text[])", ids
            )
            # Exactly the ledger, to the nano-dollar: no call rounded up on its way into Redis.
            nanos = int(sum((r["cost_usd"] for r in rows), Decimal(0)) * 1_000_000_000)
            counter = int(await redis.get(usd_key) or 0)
            tokens = int(await redis.get(tokens_key) or 0)
            return (
                len(rows) == len(ids)
                and counter == nanos
                and tokens == sum(r["total_tokens"] for r in rows)
            )

        await eventually(reconciled, 15, "the Redis budget counter to equal Postgres")


async def test_the_free_tier_serves_until_it_is_gone_then_the_cheapest_paid_provider(
    names: Names, tmp_path: Path, pipeline: Any, pg: asyncpg.Connection, mock: MockProvider
) -> None:
    providers = [
        {
            "id": "gratis",
            "models": {"m": {"input": 5, "output": 5}},
            "free_tier": {"requests_per_day": 3},
        },
        {"id": "budget", "models": {"m": {"input": 1, "output": 1}}},
    ]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers))
    async with pipeline(config):
        results = await run_jobs(names, 5, api_key=None, concurrent=False)
    assert [r.provider for r in results] == ["gratis"] * 3 + ["budget"] * 2
    assert [r.cost_usd == 0 for r in results] == [True, True, True, False, False]

    async def recorded() -> bool:
        ids = [r.job_id for r in results]
        return bool(
            await pg.fetchval("SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])", ids) == 5
        )

    await eventually(recorded, 10, "five usage rows")
    costs = await pg.fetch(
        "SELECT provider, cost_usd FROM usage WHERE job_id = ANY($1::text[]) ORDER BY provider",
        [r.job_id for r in results],
    )
    assert [(r["provider"], r["cost_usd"] == 0) for r in costs] == [
        ("budget", False),
        ("budget", False),
        ("gratis", True),
        ("gratis", True),
        ("gratis", True),
    ]


async def test_a_job_that_waits_for_quota_is_parked_and_served_later(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    # Room for one reservation (prompt + 100 output tokens) at a time: the others park until
    # the first is reconciled down to what it used.
    providers = [{"id": "p", "models": {"m": PRICE}}]
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(tpm=200)])
    )
    async with pipeline(config):
        results = await run_jobs(names, 3, on_quota="wait", params={"max_tokens": 100})
    assert [r.status.value for r in results] == ["succeeded"] * 3
    waited = [r for r in results if (r.timings.queued_ms or 0) >= 900]
    assert waited  # at least one went through a parking queue (1 s)


async def test_a_job_waiting_for_a_request_limit_sleeps_until_its_window_frees(
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key's RPM of 1: the second job cannot go before the next minute. It used to come back
    from a 1 s parking queue every second (about 60 reschedules for one wait); it now sleeps in
    the longer parking queues (32 s a hop at most), a few hops in all, and is served once the
    window frees."""
    config = load_config(
        write_config(
            tmp_path / "p.yaml",
            mock,
            [{"id": "p", "models": {"m": PRICE}}],
            keys=[key_entry(rpm=1)],
        )
    )
    parks: list[float] = []
    park = scheduler_module.park_for_quota

    async def counted(*args: Any, **kwargs: Any) -> None:
        parks.append(time.monotonic())
        await park(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "park_for_quota", counted)
    async with pipeline(config, hold_margin_s=0.5):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            now = datetime.now(UTC)
            if now.second >= 55:  # both jobs in one minute, or the second need not wait
                await asyncio.sleep(61 - now.second - now.microsecond / 1e6)
            first = await client.complete(
                job=make_job([{"role": "user", "content": "one"}], model="m"), api_key=SECRET
            )
            waited = make_job([{"role": "user", "content": "two"}], model="m", on_quota="wait")
            sent = datetime.now(UTC)
            second = await client.complete(job=waited, api_key=SECRET, timeout_s=120)
    assert (first.status.value, second.status.value) == ("succeeded", "succeeded")
    assert 1 <= len(parks) <= 5, f"parked {len(parks)} times"
    # Not served before the minute the first one used was over.
    window_end = (sent.replace(second=0, microsecond=0) + timedelta(minutes=1)).timestamp()
    assert second.timings.total_ms is not None
    assert sent.timestamp() + second.timings.total_ms / 1000 >= window_end - 0.5


async def test_a_waiting_job_waits_for_the_candidate_that_can_fit_it_not_the_one_that_never_will(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """Provider ``tiny``'s tokens per minute are fewer than any of these jobs needs; ``p`` has
    room for one at a time. The jobs after the first wait for ``p``; they used to be rejected
    whenever ``tiny``'s shortfall was the soonest to end."""
    # tiny is the dearer, so its shortfall is read last: its time to the window's end is then
    # the shortest by the microseconds between the two reads.
    providers = [
        {"id": "tiny", "tpm": 10, "models": {"m": {"input": 5000, "output": 5000}}},
        {"id": "p", "tpm": 200, "models": {"m": PRICE}},
    ]
    path = write_config(tmp_path / "p.yaml", mock, providers, default_policy="cheapest")
    async with pipeline(load_config(path)):
        results = await run_jobs(names, 3, on_quota="wait", params={"max_tokens": 100})
    assert [r.status.value for r in results] == ["succeeded"] * 3
    assert {r.provider for r in results} == {"p"}


async def test_a_parked_job_that_came_without_submitted_at_is_stamped_so_its_wait_can_end(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """An AMQP producer's job may leave out ``submitted_at``; its wait was counted from each
    return from parking, so it never reached ``MAX_WAIT_S``. The parked copy carries the time."""
    # A day's tokens for one job's reservation (prompt + 100 output) and a few more: the
    # filler's use leaves the next one short until midnight, though one alone would fit.
    providers = [{"id": "p", "models": {"m": PRICE}}]
    wait_for_me = [ChatMessage(role="user", content="wait for me")]
    budget = {"tokens_per_day": estimate_prompt_tokens(wait_for_me, ProviderType.OPENAI) + 105}
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(budgets=budget)])
    )
    body = {
        "schema_version": 1,
        "job_id": "native-waiter",
        "model": "m",
        "on_quota": "wait",
        "params": {"max_tokens": 100},
        "messages": [{"role": "user", "content": "wait for me"}],
    }
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with pipeline(config), connection:
        [filler] = await run_jobs(names, 1, params={"max_tokens": 100})
        assert filler.status.value == "succeeded"
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), headers={HEADER_KEY: SECRET}),
            routing_key=names.jobs,
        )
        parking = await channel.declare_queue(names.park(1), passive=True)
        parked: list[dict[str, Any]] = []

        async def in_the_parking_queue() -> bool:
            message = await parking.get(fail=False)
            if message is not None:
                parked.append(json.loads(message.body))
                await message.nack(requeue=True)
            return bool(parked)

        await eventually(in_the_parking_queue, 10, "the job in the parking queue")
    assert parked[0]["job_id"] == "native-waiter"
    assert datetime.fromisoformat(parked[0]["submitted_at"]).tzinfo is not None


async def test_jobs_sharing_a_job_id_are_each_charged_to_the_keys_limit(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """The reservation id was the job id, and a known id is an idempotent replay: a producer
    sending one job id twice was admitted twice on one job's share of its day's tokens."""
    messages = [ChatMessage(role="user", content="same id")]
    one_job = estimate_prompt_tokens(messages, ProviderType.OPENAI) + 100
    budget = {"tokens_per_day": one_job + 5}
    providers = [{"id": "p", "models": {"m": PRICE}}]
    path = write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(budgets=budget)])
    config = load_config(path)
    job = make_job(messages, model="m", params={"max_tokens": 100})
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            first = await client.complete(job=job, api_key=SECRET, timeout_s=30)
            second = await client.complete(job=job, api_key=SECRET, timeout_s=30)
    assert first.status.value == "succeeded"
    assert second.status.value == "rejected"
    assert second.error is not None and second.error.code.value == "rate_limited"


async def test_a_queued_job_keeps_its_reservation_and_an_expired_one_returns_it(
    names: Names, tmp_path: Path, pipeline: Any, redis: Redis, mock: MockProvider
) -> None:
    """No worker runs: every job waits in the provider queue. The holds of the jobs with a
    deadline pass soon after it (RabbitMQ drops those jobs unseen), and the sweeper returns
    their requests. The batch jobs without one are only queued: their holds used to pass after
    the same short margin, and the refund let later jobs past the limit."""
    providers = [{"id": "p", "timeout_s": 0.5, "max_attempts": 1, "models": {"m": PRICE}}]
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(rpm=50)])
    )
    if datetime.now(UTC).second >= 40:  # keep the whole test inside one minute window
        await asyncio.sleep(61 - datetime.now(UTC).second)
    minute = window(Period.MINUTE, datetime.now(UTC), ZoneInfo("UTC")).id
    rpm_key = names.quota_bucket("key", "team-a", "rpm", minute)
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with pipeline(config, workers=[], accountant=False, hold_margin_s=0.5), client:
        queue = await client.open_results("held")
        deadline = datetime.now(UTC) + timedelta(seconds=1.5)
        for i in range(6):
            job = make_job([{"role": "user", "content": f"held {i}"}], model="m")
            if i % 2:
                job = job.model_copy(update={"deadline": deadline})
            await client.submit(job, results_queue=queue, api_key=SECRET)

        def holding(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return int(await redis.get(rpm_key) or 0) == count

            return check

        await eventually(holding(6), 10, "six requests held")
        await eventually(holding(3), 10, "the expired jobs' holds returned")
        await asyncio.sleep(2)  # the margin and a sweep again: the queued jobs still hold theirs
        assert int(await redis.get(rpm_key) or 0) == 3
        await client.delete_results(queue)


async def test_a_cel_rule_on_day_tokens_used_reroutes_once_the_threshold_is_crossed(
    names: Names, tmp_path: Path, pipeline: Any, redis: Redis, mock: MockProvider
) -> None:
    providers = [
        {"id": "first", "models": {"m": {"input": 1, "output": 1}}},
        {"id": "second", "models": {"m": {"input": 2, "output": 2}}},
    ]
    rules = [
        {
            "name": "spare-first",
            "when": 'provider.id == "first" && provider.day_tokens_used > 60',
            "action": "deny",
        }
    ]
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, providers, rules=rules, default_policy="cheapest")
    )
    results = []
    async with pipeline(config):
        for _ in range(5):
            [result] = await run_jobs(names, 1, api_key=None, params={"max_tokens": 20})
            results.append(result)

            # The counter the rule reads is reserved tokens until the accountant reconciles it to
            # the tokens used; wait for that (no hold left), so each job routes on settled usage.
            async def settled() -> bool:
                return await redis.zcard(names.redis_key("quota-holds")) == 0

            await eventually(settled, 10, "the reservation to be reconciled")
    providers_used = [r.provider for r in results]
    # Each job uses ~25 tokens on "first"; once its day counter passes 60, the rule denies it.
    assert providers_used[0] == "first"
    switch = providers_used.index("second")
    assert providers_used[switch:] == ["second"] * (5 - switch)
    assert all(r.status.value == "succeeded" for r in results)


@pytest.mark.parametrize(
    ("alerts", "jobs", "percents"),
    [
        pytest.param(None, 21, [80, 95], id="default-80-and-95"),
        # alerts.thresholds used to be read and ignored: 80 % and 95 % fired whatever it said
        pytest.param({"thresholds": [0.5]}, 17, [50], id="configured-50"),
    ],
)
async def test_crossing_a_budget_threshold_alerts_once_each(
    alerts: dict[str, Any] | None,
    jobs: int,
    percents: list[int],
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    # Without the accountant nothing is reconciled, so each job holds exactly its reservation
    # (estimated prompt + max_tokens, the same for every job here): 20 of them fill the budget,
    # the 11th crosses 50 %, the 16th 80 % and the 19th 95 %, and the 21st is refused.
    per_job = (
        estimate_prompt_tokens(
            [ChatMessage(role="user", content="budget question 1")], ProviderType.OPENAI
        )
        + 20
    )
    providers = [{"id": "p", "models": {"m": PRICE}}]
    top = {"alerts": alerts} if alerts else {}
    path = write_config(
        tmp_path / "p.yaml",
        mock,
        providers,
        keys=[key_entry(budgets={"tokens_per_day": 20 * per_job})],
        **top,
    )
    async with pipeline(load_config(path), accountant=False):
        results = await run_jobs(names, jobs, concurrent=False, params={"max_tokens": 20})
    served = min(jobs, 20)
    assert [r.status.value for r in results] == ["succeeded"] * served + ["rejected"] * (
        jobs - served
    )
    channel = await amqp.channel()
    queue = await channel.declare_queue(names.alerts, passive=True)
    sent = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        await message.ack()
        sent.append(json.loads(message.body))
    await channel.close()
    key_alerts = [a for a in sent if a["label"] == "key team-a tokens per day"]
    assert sorted(a["threshold_percent"] for a in key_alerts) == percents


async def test_a_job_that_expires_before_its_call_gives_its_reservation_back_whole(
    names: Names, tmp_path: Path, pipeline: Any, redis: Redis, mock: MockProvider
) -> None:
    """A job that never reached its provider (its deadline passed while it waited for the one
    call slot) used to be reconciled to zero tokens with its request still counted."""
    mock.configure(latency_ms=3000)
    providers = [{"id": "p", "concurrency": 1, "models": {"m": PRICE}}]
    path = write_config(tmp_path / "p.yaml", mock, providers, keys=[key_entry(rpm=100)])
    async with pipeline(load_config(path)):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            first = make_job([{"role": "user", "content": "slow"}], model="m")
            holding = asyncio.create_task(client.complete(job=first, api_key=SECRET, timeout_s=30))

            async def calling() -> bool:
                return bool(mock.stats()["in_flight"] == 1)

            await eventually(calling, 10, "the first call at the provider")
            late = make_job([{"role": "user", "content": "late"}], model="m")
            late = late.model_copy(update={"deadline": datetime.now(UTC) + timedelta(seconds=1)})
            result = await client.complete(job=late, api_key=SECRET, timeout_s=30)
            await holding
        assert result.status.value == "expired"
        pattern = names.redis_key("reservation", f"{late.job_id}:*")

        async def released() -> bool:
            records = [key async for key in redis.scan_iter(match=pattern)]
            states = [await redis.hget(key, "state") for key in records]
            return states == [b"released"]

        await eventually(released, 10, "the late job's reservation released")


@pytest.mark.parametrize(("rule_on", "priority"), [("tiny", 0), ("p", 9)])
async def test_a_set_priority_rule_applies_to_the_candidate_quota_admitted(
    rule_on: str,
    priority: int,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    pg: asyncpg.Connection,
) -> None:
    """The rule's priority was taken from the router's first choice even when quota sent the
    job to another candidate, whose queue then ordered it by a rule that never matched it. A
    rule on the candidate admitted still sets it."""
    providers: list[dict[str, Any]] = [
        {"id": "tiny", "tpm": 10, "models": {"m": PRICE}},  # first by price; never fits the job
        {"id": "p", "models": {"m": {"input": 2000, "output": 2000}}},
    ]
    rule = f'provider.id == "{rule_on}"'
    rules = [{"name": "rush", "when": rule, "action": "set_priority", "value": 9}]
    path = write_config(
        tmp_path / "p.yaml", mock, providers, rules=rules, default_policy="cheapest"
    )
    async with pipeline(load_config(path)):
        [result] = await run_jobs(names, 1, api_key=None, params={"max_tokens": 100})

        async def recorded() -> bool:
            row = await pg.fetchval("SELECT 1 FROM jobs WHERE job_id = $1", result.job_id)
            return bool(row == 1)

        await eventually(recorded, 10, "the job's row")
    assert result.provider == "p"
    row_priority = await pg.fetchval("SELECT priority FROM jobs WHERE job_id = $1", result.job_id)
    assert row_priority == priority


# --- jobs without max_tokens ---------------------------------------------------------------


async def settle(redis: Redis, names: Names) -> None:
    """Wait until the accountant has reconciled every reservation (none is held)."""

    async def settled() -> bool:
        return await redis.zcard(names.redis_key("quota-holds")) == 0

    await eventually(settled, 10, "the reservations to be reconciled")


async def test_a_job_without_max_tokens_is_sent_the_small_cap_its_budget_allows(
    names: Names, tmp_path: Path, pipeline: Any, redis: Redis, mock: MockProvider
) -> None:
    """A day's tokens far below the 1,024 output tokens such a job used to reserve (it was
    refused at once): each job now reserves the smallest useful answer, is sent that cap (the
    mock cuts its answer there), and jobs are refused once less than that is left."""
    asked = [{"role": "user", "content": "budget question 0"}]  # what run_jobs(…, 1) sends
    estimate = estimate_prompt_tokens([ChatMessage.model_validate(asked[0])], ProviderType.OPENAI)
    text, _ = expected_completion(asked)
    assert count_tokens(text) > MIN_OUTPUT_TOKENS  # the full answer would pass the cap
    budget = estimate + 100
    config = load_config(
        write_config(
            tmp_path / "p.yaml",
            mock,
            [{"id": "p", "models": {"m": PRICE}}],
            keys=[key_entry(budgets={"tokens_per_day": budget})],
        )
    )
    results = []
    async with pipeline(config):
        for _ in range(8):
            [result] = await run_jobs(names, 1)
            results.append(result)
            await settle(redis, names)
    # Admitted while a prompt and the smallest answer fit what the calls before used.
    served, used = 0, 0
    while used + estimate + MIN_OUTPUT_TOKENS <= budget:
        served, used = served + 1, used + prompt_tokens(asked) + MIN_OUTPUT_TOKENS
    assert served >= 3
    assert [r.status.value for r in results] == ["succeeded"] * served + ["rejected"] * (8 - served)
    for result in results[:served]:
        assert result.response is not None and result.usage is not None
        assert result.response.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == MIN_OUTPUT_TOKENS
    day = window(Period.DAY, datetime.now(UTC), ZoneInfo("UTC")).id
    counter = int(await redis.get(names.quota_bucket("key", "team-a", "tokens_day", day)) or 0)
    assert counter == used <= budget


async def test_max_completion_tokens_is_the_jobs_own_cap_for_its_reservation(
    names: Names, tmp_path: Path, pipeline: Any, redis: Redis, mock: MockProvider
) -> None:
    """OpenAI's newer name for the cap was sent to the provider but not reserved by: the job
    reserved 1,024 output tokens and was refused under a budget its own cap fits exactly."""
    asked = [ChatMessage(role="user", content="budget question 0")]
    budget = estimate_prompt_tokens(asked, ProviderType.OPENAI) + 20
    config = load_config(
        write_config(
            tmp_path / "p.yaml",
            mock,
            [{"id": "p", "models": {"m": PRICE}}],
            keys=[key_entry(budgets={"tokens_per_day": budget})],
        )
    )
    async with pipeline(config):
        [result] = await run_jobs(names, 1, params={"max_completion_tokens": 20})
        [refused] = await run_jobs(names, 1, params={"max_completion_tokens": 20})
    assert result.status.value == "succeeded"
    assert result.usage is not None and result.usage.completion_tokens == 20
    assert refused.status.value == "rejected"  # its own cap is never sized down
    [record] = [k async for k in redis.scan_iter(match=names.reservation(f"{result.job_id}:*"))]
    buckets = await redis.hget(record, "buckets")
    assert buckets is not None
    held = {b["unit"]: b["amount"] for b in json.loads(buckets)}
    assert held["tokens"] == budget

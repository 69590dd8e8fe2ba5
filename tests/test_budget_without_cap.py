"""Budgets for jobs that set no ``max_tokens`` (#15, finding 6), through the real pipeline.

Each such job used to reserve 1,024 output tokens and send no cap: under a budget of $0.002 the
first three held all of it for answers of a few dozen tokens, 491 of 500 jobs were refused with
94 % unspent, and an answer longer than its reservation could still pass the budget. Now the cap
is sized to a share of what the budget has left, reserved, and sent to the provider: 500 jobs at
once spend most of the budget and never more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from redis.asyncio import Redis

from broker.client import SwitchyardClient, make_job
from broker.core.config import ProviderType, load_config
from broker.core.names import Names
from broker.core.tokens import estimate_prompt_tokens
from broker.core.windows import Period, window
from mock_provider.answers import prompt_tokens
from schemas import ChatMessage, JobResult
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config

SECRET = "sk-switchyard-budget-test"
PRICE = {"input": "0.15", "output": "0.60"}  # gpt-4o-mini's list price, USD per million tokens
USD_BUDGET = Decimal("0.002")
TOKEN_BUDGET = 4_000  # about a hundred of the mock's answers with their prompts
JOBS = 500
WAIT_S = 10.0  # how long a waiting job may wait for the budget (its deadline)


def question(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"budget question {i}"}]


async def run_burst(names: Names, on_quota: str) -> list[JobResult]:
    """``JOBS`` jobs without max_tokens, all sent at once; waiting ones give up after
    ``WAIT_S``."""
    deadline = datetime.now(UTC) + timedelta(seconds=WAIT_S) if on_quota == "wait" else None
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:

        async def one(i: int) -> JobResult:
            job = make_job(question(i), model="m", on_quota=on_quota, deadline=deadline)
            return await client.complete(job=job, api_key=SECRET, timeout_s=WAIT_S + 45)

        return list(await asyncio.gather(*(one(i) for i in range(JOBS))))


async def reservations(redis: Redis, names: Names) -> list[dict[str, Any]]:
    """Every reservation record of this test: what it held and what its call used."""
    records = []
    async for key in redis.scan_iter(match=names.redis_key("reservation", "*"), count=1000):
        fields = await redis.hgetall(key)
        records.append({_text(k): _text(v) for k, v in fields.items()})
    return records


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize("on_quota", ["wait", "reject"])
@pytest.mark.parametrize("budget", ["usd", "tokens"])
async def test_500_jobs_without_max_tokens_spend_most_of_a_small_budget_and_never_more(
    budget: str,
    on_quota: str,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    redis: Redis,
    mock: MockProvider,
) -> None:
    # A budget is charged at estimated prompt tokens: they must not be fewer than the provider
    # counts, or a call could cost more than it held.
    for i in (0, 7, JOBS - 1):
        messages = [ChatMessage.model_validate(m) for m in question(i)]
        assert estimate_prompt_tokens(messages, ProviderType.OPENAI) >= prompt_tokens(question(i))
    now = datetime.now(UTC)
    day = window(Period.DAY, now, ZoneInfo("UTC"))
    if day.expires_at - now.timestamp() < WAIT_S + 60:
        pytest.skip("too close to midnight UTC: the day's budget would start again mid-test")
    limit = (
        {"usd_per_day": str(USD_BUDGET)} if budget == "usd" else {"tokens_per_day": TOKEN_BUDGET}
    )
    key = {"id": "team-b", "key_sha256": hashlib.sha256(SECRET.encode()).hexdigest()}
    providers = [{"id": "p", "concurrency": 50, "models": {"m": PRICE}}]
    path = write_config(tmp_path / "p.yaml", mock, providers, keys=[{**key, "budgets": limit}])

    started = time.monotonic()
    async with pipeline(load_config(path)):
        results = await run_burst(names, on_quota)
        took_s = time.monotonic() - started
        succeeded = [r for r in results if r.status.value == "succeeded"]
        ids = [r.job_id for r in succeeded]

        async def settled() -> bool:
            rows = await pg.fetchval(
                "SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])", ids
            )
            holds = await redis.zcard(names.redis_key("quota-holds"))
            return bool(rows == len(ids) and holds == 0)

        await eventually(settled, 20, "every call in the ledger and every reservation settled")

    row = await pg.fetchrow(
        "SELECT sum(cost_usd) AS usd, sum(total_tokens) AS tokens, count(*) AS calls"
        " FROM usage WHERE job_id = ANY($1::text[])",
        ids,
    )
    spent = Decimal(row["usd"]) if budget == "usd" else Decimal(row["tokens"])
    allowed = USD_BUDGET if budget == "usd" else Decimal(TOKEN_BUDGET)
    outcomes = Counter((r.status.value, r.error.code.value if r.error else None) for r in results)
    cut = sum(
        1 for r in succeeded if r.response and r.response.choices[0].finish_reason == "length"
    )
    last_s = max((r.timings.total_ms or 0.0) for r in succeeded) / 1000 if succeeded else 0.0
    print(
        f"\n{budget} budget {allowed}, on_quota={on_quota}: spent {spent}"
        f" ({spent / allowed:.1%}) in {row['calls']} calls; outcomes {dict(outcomes)};"
        f" {cut} answers cut by their cap; last answer after {last_s:.1f} s; all {took_s:.1f} s"
    )

    assert spent <= allowed
    assert spent >= allowed * Decimal("0.8")
    assert mock.stats()["calls"] == len(succeeded) == row["calls"]
    refused = {("rejected", "rate_limited"), ("expired", "deadline_exceeded")}
    assert set(outcomes) <= {("succeeded", None), *refused}
    # The caps reached the provider: none of these jobs set one, yet answers were cut by it.
    assert cut > 0
    # No call used more than its reservation held (what makes the budget a bound).
    records = await reservations(redis, names)
    assert len(records) == len(succeeded)
    for record in records:
        held = {b["unit"]: b["amount"] for b in json.loads(record["buckets"])}
        used = json.loads(record["actual"])
        assert record["state"] == "reconciled"
        assert all(used[unit] <= amount for unit, amount in held.items() if unit != "requests")

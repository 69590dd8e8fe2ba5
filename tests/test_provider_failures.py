"""What a producer gets when the provider misbehaves: retries where they help, a typed error where
they do not, and usage recorded only for calls that consumed tokens."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.client import SwitchyardClient, make_job
from broker.core.config import load_config
from broker.core.names import Names
from schemas import JobResult
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config


@pytest.fixture
def flaky_config(tmp_path: Path, mock: MockProvider) -> Any:
    path = write_config(
        tmp_path / "p.yaml",
        mock,
        [{"id": "flaky", "concurrency": 2, "timeout_s": 0.5, "max_attempts": 3}],
    )
    return load_config(path)


async def run_one(names: Names, pipeline: Any, config: Any, **job_fields: Any) -> JobResult:
    job = make_job(
        [{"role": "user", "content": f"question {uuid.uuid4()}"}], model="gpt-4o-mini", **job_fields
    )
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            return await client.complete(job=job, timeout_s=30)


async def job_row(pg: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    async def recorded() -> bool:
        return await pg.fetchval("SELECT 1 FROM jobs WHERE job_id = $1", job_id) is not None

    await eventually(recorded, 10, f"the jobs row of {job_id}")
    row = await pg.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    assert row is not None
    return row


@pytest.mark.parametrize(
    ("fault", "retried_code"),
    [("rate_limit", "rate_limited"), ("server_error", "server_error"), ("timeout", "timeout")],
)
async def test_a_passing_fault_is_retried_and_the_retry_is_the_recorded_attempt(
    fault: str,
    retried_code: str,
    names: Names,
    flaky_config: Any,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    mock.configure(retry_after_s=0, fail_next={"kind": fault, "count": 1})
    result = await run_one(names, pipeline, flaky_config)
    assert result.status.value == "succeeded"
    assert [(a.number, a.status, a.error_code) for a in result.attempts] == [
        (1, "failed", retried_code),
        (2, "succeeded", None),
    ]
    await job_row(pg, result.job_id)
    rows = await pg.fetch("SELECT attempt FROM usage WHERE job_id = $1", result.job_id)
    assert [r["attempt"] for r in rows] == [2]


@pytest.mark.parametrize(
    ("fault", "code", "attempts"),
    [
        ("auth", "authentication", 1),
        ("malformed", "provider_protocol_error", 1),
        ("server_error", "server_error", 3),
    ],
)
async def test_a_lasting_fault_fails_the_job_with_a_typed_error_and_no_usage(
    fault: str,
    code: str,
    attempts: int,
    names: Names,
    flaky_config: Any,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    mock.configure(fail_next={"kind": fault, "count": 5})
    result = await run_one(names, pipeline, flaky_config)
    assert result.status.value == "failed"
    assert result.error is not None
    assert (result.error.code.value, result.error.provider) == (code, "flaky")
    assert result.response is None
    assert len(result.attempts) == attempts
    assert mock.stats()["calls"] == attempts
    row = await job_row(pg, result.job_id)
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", code, attempts)
    assert await pg.fetchval("SELECT count(*) FROM usage WHERE job_id = $1", result.job_id) == 0


async def test_a_job_past_its_deadline_expires_without_a_provider_call(
    names: Names, flaky_config: Any, pipeline: Any, pg: asyncpg.Connection, mock: MockProvider
) -> None:
    job = make_job([{"role": "user", "content": "too late"}], model="gpt-4o-mini")
    job = job.model_copy(update={"deadline": datetime.now(UTC) - timedelta(seconds=1)})
    async with pipeline(flaky_config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            result = await client.complete(job=job, timeout_s=30)
    assert result.status.value == "expired"
    assert result.error is not None
    assert result.error.code.value == "deadline_exceeded"
    assert mock.stats()["calls"] == 0
    row = await job_row(pg, job.job_id)
    assert row["status"] == "expired"


async def test_a_rate_limit_asking_a_longer_wait_than_a_retry_may_hold_is_returned_at_once(
    names: Names, flaky_config: Any, pipeline: Any, mock: MockProvider
) -> None:
    """A 429 with retry-after 30 s: retried after the 10 s cap it was refused again, and the
    job spent its attempts holding a call slot. The caller gets the 429 and its retry_after."""
    mock.configure(retry_after_s=30, fail_next={"kind": "rate_limit", "count": 5})
    result = await run_one(names, pipeline, flaky_config)
    assert result.status.value == "failed"
    assert result.error is not None
    assert (result.error.code.value, result.error.retry_after) == ("rate_limited", 30)
    assert len(result.attempts) == 1 and mock.stats()["calls"] == 1


async def test_a_job_waiting_for_a_global_lease_expires_at_its_deadline_without_a_call(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """One global lease, held by a 3 s call; the next job's deadline comes first. It used to
    wait for the lease however long, then call the provider after its deadline."""
    mock.configure(latency_ms=3000)
    provider = {"id": "capped", "concurrency": 2, "global_concurrency": 1, "timeout_s": 10}
    config = load_config(write_config(tmp_path / "p.yaml", mock, [provider]))
    holder = make_job([{"role": "user", "content": "hold the lease"}], model="gpt-4o-mini")
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            holding = asyncio.create_task(client.complete(job=holder, timeout_s=30))

            async def leased() -> bool:
                return bool(mock.stats()["in_flight"] == 1)

            await eventually(leased, 10, "the first call at the provider")
            late = make_job([{"role": "user", "content": "in a hurry"}], model="gpt-4o-mini")
            late = late.model_copy(update={"deadline": datetime.now(UTC) + timedelta(seconds=1)})
            result = await client.complete(job=late, timeout_s=30)
            assert (await holding).status.value == "succeeded"
    assert result.status.value == "expired"
    assert result.error is not None and result.error.code.value == "deadline_exceeded"
    assert mock.stats()["calls"] == 1

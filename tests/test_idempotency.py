"""Idempotency keys over AMQP on real RabbitMQ, Redis and Postgres: a repeat gets the first
job's result without a provider call or a usage row; a first job refused gives its key back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import asyncpg

from broker.client import SwitchyardClient, make_job
from broker.core.config import load_config
from broker.core.names import Names
from mock_provider import expected_completion
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config

QUESTION = [{"role": "user", "content": "Say it once."}]


async def test_a_repeated_key_is_answered_from_the_first_job_with_one_call(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider, pg: asyncpg.Connection
) -> None:
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "p"}]))
    mock.configure(latency_ms=300)
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with pipeline(config), client:
        queue = await client.open_results("repeats")
        jobs = [
            make_job(QUESTION, model="gpt-4o-mini", idempotency_key="invoice-9") for _ in range(3)
        ]
        for job in jobs[:2]:  # the second while the first runs
            await client.submit(job, results_queue=queue)
        results = {}
        async for result in client.results(queue):
            results[result.job_id] = result
            if len(results) == 2:
                break
        # The third after the first ended, over RPC this time.
        results[jobs[2].job_id] = await client.complete(job=jobs[2], timeout_s=30)
    first, *repeats = (results[job.job_id] for job in jobs)
    content = expected_completion(QUESTION)[0]
    assert first.status.value == "succeeded" and first.replay_of is None
    for repeat in repeats:
        assert repeat.status.value == "succeeded" and repeat.replay_of == jobs[0].job_id
        assert repeat.response is not None
        assert repeat.response.choices[0].message.content == content
    assert mock.stats()["calls"] == 1
    ids = [job.job_id for job in jobs]

    async def ended() -> bool:
        sql = "SELECT count(*) FROM jobs WHERE job_id = ANY($1::text[])"
        return bool(await pg.fetchval(sql, ids) == 3)

    await eventually(ended, 10, "three job rows")
    sql = "SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])"
    assert await pg.fetchval(sql, ids) == 1


async def test_a_first_job_refused_gives_its_key_back(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    secret = "sk-idempotent-team"
    key = {"id": "team", "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}
    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "p"}], keys=[key]))
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with pipeline(config), client:
        refused = await client.complete(
            QUESTION,
            model="no-such-model",
            idempotency_key="retry-me",
            api_key=secret,
            timeout_s=30,
        )
        assert refused.status.value == "rejected"
        # Its scheduler gave the key back as it refused it: the repeat runs at once.
        again = await client.complete(
            QUESTION, model="gpt-4o-mini", idempotency_key="retry-me", api_key=secret, timeout_s=5
        )
        assert again.status.value == "succeeded" and again.replay_of is None
    assert mock.stats()["calls"] == 1

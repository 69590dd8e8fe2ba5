"""Real processes: a worker killed with SIGKILL in the middle of provider calls loses nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.names import Names
from mock_provider import expected_completion
from tests.conftest import (
    AMQP_URL,
    REPO,
    MockProvider,
    consumer_count,
    eventually,
    process_env,
    write_config,
)


class Processes:
    """``switchyard`` subprocesses started by a test, stopped by PID when it ends."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{'-'.join(args)}-{len(self.running)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def processes(
    names: Names, database_url: str, tmp_path: Path, mock: MockProvider
) -> Iterator[Processes]:
    config = write_config(tmp_path / "p.yaml", mock, [{"id": "slow", "concurrency": 4}])
    procs = Processes(process_env(names, database_url, config), tmp_path)
    yield procs
    procs.stop_all()


async def test_a_worker_killed_mid_call_loses_no_job_and_records_each_call_once(
    amqp: AbstractRobustConnection,
    names: Names,
    processes: Processes,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    mock.configure(latency_ms=2000)
    processes.start("scheduler")
    processes.start("accountant")
    doomed = processes.start("worker", "--provider", "slow")

    async def consumers_up() -> bool:
        return (
            await consumer_count(amqp, names.jobs) == 1
            and await consumer_count(amqp, names.usage) == 1
            and await consumer_count(amqp, names.provider("slow")) == 1
        )

    await eventually(consumers_up, 30, "scheduler, accountant and worker to consume")
    prompts = [[{"role": "user", "content": f"slow question {i}"}] for i in range(8)]
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        calls = [
            asyncio.create_task(client.complete(p, model="gpt-4o-mini", timeout_s=60))
            for p in prompts
        ]

        async def calls_in_flight() -> bool:
            return bool(mock.stats()["in_flight"] == 4)

        await eventually(calls_in_flight, 20, "the worker to have 4 calls in flight")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        processes.start("worker", "--provider", "slow")
        results = await asyncio.wait_for(asyncio.gather(*calls), 90)

    assert [r.status.value for r in results] == ["succeeded"] * 8
    for prompt, result in zip(prompts, results, strict=True):
        assert result.response is not None
        assert result.response.choices[0].message.content == expected_completion(prompt)[0]
    job_ids = [r.job_id for r in results]
    assert len(set(job_ids)) == 8
    # The 4 calls the killed worker made were never completed for it; all 8 were re-made.
    assert mock.stats()["calls"] >= 12

    async def all_recorded() -> bool:
        sql = "SELECT count(*) FROM jobs WHERE job_id = ANY($1::text[])"
        return bool(await pg.fetchval(sql, job_ids) == 8)

    await eventually(all_recorded, 20, "8 job rows")
    rows = await pg.fetch(
        "SELECT job_id, attempt, prompt_tokens, completion_tokens FROM usage"
        " WHERE job_id = ANY($1::text[])",
        job_ids,
    )
    assert sorted(r["job_id"] for r in rows) == sorted(job_ids)  # one row per completed call
    by_job = {r["job_id"]: r for r in rows}
    for result in results:
        assert result.usage is not None
        row = by_job[result.job_id]
        assert row["prompt_tokens"] == result.usage.prompt_tokens
        assert row["completion_tokens"] == result.usage.completion_tokens

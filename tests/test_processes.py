"""Real processes: a worker killed with SIGKILL in the middle of provider calls loses nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.core.names import Names
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


async def test_a_global_cap_holds_across_worker_processes_and_a_dead_workers_leases_expire(
    amqp: AbstractRobustConnection,
    names: Names,
    database_url: str,
    tmp_path: Path,
    mock: MockProvider,
) -> None:
    from redis.asyncio import Redis

    from tests.conftest import REDIS_URL

    providers = [
        {
            "id": "capped",
            "concurrency": 4,
            "global_concurrency": 3,
            "timeout_s": 2,
            "max_attempts": 1,
        },
    ]
    config = write_config(tmp_path / "g.yaml", mock, providers)
    procs = Processes(process_env(names, database_url, config), tmp_path)
    redis = Redis.from_url(REDIS_URL)
    leases = names.lease("capped")
    try:
        procs.start("scheduler")
        first = procs.start("worker", "--provider", "capped")
        second = procs.start("worker", "--provider", "capped")

        async def up() -> bool:
            return await consumer_count(amqp, names.provider("capped")) == 2

        await eventually(up, 30, "two workers")
        mock.configure(latency_ms=300)
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            results = await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": f"capped {i}"}],
                        model="gpt-4o-mini",
                        timeout_s=60,
                    )
                    for i in range(20)
                )
            )
            assert [r.status.value for r in results] == ["succeeded"] * 20
            assert mock.stats()["max_in_flight"] == 3  # 8 slots in two processes, 3 leases

            # Only the doomed worker serves now, so it holds every lease when it is killed.
            second.send_signal(signal.SIGTERM)
            second.wait(15)
            mock.configure(latency_ms=1500)
            calls = [
                asyncio.create_task(
                    client.complete(
                        [{"role": "user", "content": f"doomed {i}"}],
                        model="gpt-4o-mini",
                        timeout_s=60,
                    )
                )
                for i in range(6)
            ]

            async def three_held() -> bool:
                return bool(await redis.zcard(leases) == 3 and mock.stats()["in_flight"] == 3)

            await eventually(three_held, 10, "three leases held")
            first.send_signal(signal.SIGKILL)
            first.wait(10)

            async def valid_leases() -> int:
                # Leases still valid: expiry (ms, Redis clock on this same machine) after now.
                return int(await redis.zcount(leases, f"({int(time.time() * 1000)}", "+inf"))

            assert await valid_leases() == 3  # the dead worker's, not yet expired

            async def none_held() -> bool:
                return await valid_leases() == 0

            # They last 2 s (timeout) + 2 s (margin) from their grant, then are free again.
            await eventually(none_held, 15, "the dead worker's leases to expire")
            # A new worker gets the slots back and finishes the redelivered jobs.
            procs.start("worker", "--provider", "capped")
            done = await asyncio.wait_for(asyncio.gather(*calls), 90)
        assert [r.status.value for r in done] == ["succeeded"] * 6
    finally:
        procs.stop_all()
        await redis.aclose()

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
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient, make_job
from broker.core.names import Names
from mock_provider import expected_completion
from tests.conftest import (
    AMQP_URL,
    REPO,
    MockProvider,
    consumer_count,
    eventually,
    process_env,
    queue_depth,
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
    providers = [{"id": "slow", "concurrency": 4, "timeout_s": 3, "max_attempts": 1}]
    config = write_config(tmp_path / "p.yaml", mock, providers)
    env = process_env(names, database_url, config)
    # A killed worker's calls are swept (3 s + 10 s backoff) x 1 attempt + 1 s after they started.
    env["SWITCHYARD_CALL_SETTLE_MARGIN_S"] = "1"
    procs = Processes(env, tmp_path)
    yield procs
    procs.stop_all()


async def ledger_matches_the_provider(
    pg: asyncpg.Connection, mock: MockProvider, job_ids: list[str]
) -> bool:
    """Every call the provider served is one usage row, settled or swept, and no more."""
    sql = "SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])"
    return bool(await pg.fetchval(sql, job_ids) == mock.stats()["calls"])


async def test_a_worker_killed_mid_call_loses_no_job_and_its_calls_are_swept_into_the_ledger(
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
    assert mock.stats()["calls"] == 12

    await eventually(
        lambda: ledger_matches_the_provider(pg, mock, job_ids), 30, "the 4 lost calls to be swept"
    )
    rows = await pg.fetch(
        "SELECT u.job_id, u.prompt_tokens, u.completion_tokens, u.estimated, u.swept,"
        " c.reserved_prompt_tokens, c.reserved_completion_tokens, c.settled_at"
        " FROM usage u JOIN calls c USING (call_id) WHERE u.job_id = ANY($1::text[])",
        job_ids,
    )
    assert len(rows) == 12  # every call was recorded as started before its request left
    swept = [r for r in rows if r["swept"]]
    assert len(swept) == 4 and all(r["estimated"] for r in swept)
    for row in swept:  # counted at what was reserved for the call
        assert row["prompt_tokens"] == row["reserved_prompt_tokens"] > 0
        assert row["completion_tokens"] == row["reserved_completion_tokens"] > 0
    settled = {r["job_id"]: r for r in rows if not r["swept"]}
    assert sorted(settled) == sorted(job_ids)  # one settled call per job: its answer
    for result in results:
        assert result.usage is not None
        row = settled[result.job_id]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
        )
    assert all(r["settled_at"] is not None for r in rows)


async def test_a_scheduler_killed_mid_run_gives_each_job_one_result_and_the_ledger_every_call(
    amqp: AbstractRobustConnection,
    names: Names,
    processes: Processes,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    """A scheduler killed between forwarding jobs and acking them: RabbitMQ delivers those jobs
    again and the next scheduler forwards them a second time. Both twins may be called (each
    call is in the ledger), but the durable results queue gets one result per job."""
    mock.configure(latency_ms=20)
    processes.start("accountant")
    processes.start("worker", "--provider", "slow")

    async def consumers_up() -> bool:
        return (
            await consumer_count(amqp, names.usage) == 1
            and await consumer_count(amqp, names.provider("slow")) == 1
        )

    await eventually(consumers_up, 30, "accountant and worker to consume")
    count = 2000
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        results_queue = await client.open_results("crash")
        jobs = [
            make_job([{"role": "user", "content": f"batch {i}"}], model="gpt-4o-mini")
            for i in range(count)
        ]
        await asyncio.gather(*(client.submit(j, results_queue=results_queue) for j in jobs))
        # Killed while it works through the backlog, with forwarded jobs not yet acked.
        doomed = processes.start("scheduler")

        async def forwarding() -> bool:
            return await queue_depth(amqp, names.provider("slow")) >= 50

        await eventually(forwarding, 30, "the scheduler to forward jobs", interval_s=0.005)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        processes.start("scheduler")
        answers = await read_results(amqp, results_queue, count, timeout_s=90)

    # The raw queue, not the client's de-duplicating reader: no job id twice.
    assert sorted(answers) == sorted(j.job_id for j in jobs)
    assert set(answers.values()) == {"succeeded"}
    job_ids = [j.job_id for j in jobs]
    await eventually(
        lambda: ledger_matches_the_provider(pg, mock, job_ids), 30, "every call's usage row"
    )
    print(f"\n{count} jobs, {mock.stats()['calls']} calls after the scheduler was killed")
    assert mock.stats()["calls"] >= count


async def read_results(
    amqp: AbstractRobustConnection, queue_name: str, count: int, timeout_s: float
) -> dict[str, str]:
    """Job id -> status of the results in ``queue_name``, read raw until ``count`` arrived and
    the queue stayed empty for a second; fails if a job id comes twice."""
    seen: dict[str, str] = {}
    channel = await amqp.channel()
    try:
        queue = await channel.get_queue(queue_name)
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                if len(seen) >= count and time.monotonic() - quiet_since > 1.0:
                    return seen
                await asyncio.sleep(0.02)
                continue
            quiet_since = time.monotonic()
            result = orjson.loads(message.body)
            assert result["job_id"] not in seen, f"a second result for {result['job_id']}"
            seen[result["job_id"]] = result["status"]
    finally:
        await channel.close()
    raise AssertionError(f"{len(seen)} of {count} results within {timeout_s} s")


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


async def test_the_gateway_process_serves_the_openai_sdk_in_front_of_the_process_pipeline(
    amqp: AbstractRobustConnection,
    names: Names,
    database_url: str,
    tmp_path: Path,
    mock: MockProvider,
) -> None:
    """``switchyard gateway``, ``scheduler``, ``worker`` and ``accountant`` as the CLI runs
    them, the official SDK as the client (the in-process tests cover the behaviours)."""
    import httpx
    from openai import AsyncOpenAI

    from tests.conftest import free_port, write_config

    config = write_config(tmp_path / "p.yaml", mock, [{"id": "p"}])
    env = process_env(names, database_url, config)
    port = free_port()
    procs = Processes(env, tmp_path)
    try:
        procs.start("gateway", "--port", str(port))
        procs.start("scheduler")
        procs.start("worker", "--provider", "p")
        procs.start("accountant")

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    answer = await http.get(f"http://127.0.0.1:{port}/readyz")
                return (
                    answer.status_code == 200
                    and await consumer_count(amqp, names.provider("p")) == 1
                )
            except httpx.TransportError:
                return False

        await eventually(ready, 30, "the gateway ready and the worker consuming")
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        messages = [{"role": "user", "content": "through every process"}]
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]
        )
        assert completion.choices[0].message.content == expected_completion(messages)[0]
        assert [m.id async for m in client.models.list()] == ["gpt-4o-mini"]
    finally:
        procs.stop_all()
    assert [p.returncode for p in procs.running] == [0, 0, 0, 0]

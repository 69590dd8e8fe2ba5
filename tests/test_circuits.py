"""Circuit breakers in Redis and through the real pipeline: a provider whose calls fail in a row
is routed around, the jobs already queued for it are answered at once without calling it, and a
trial call after ``open_s`` closes it again."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.client import SwitchyardClient, make_job
from broker.core.config import CircuitConfig, load_config
from broker.core.names import Names
from broker.state.circuits import Circuits, CircuitState, CircuitView
from schemas import JobResult
from tests.conftest import (
    AMQP_URL,
    MockProvider,
    cheap_then_dear,
    dead_provider,
    eventually,
    free_port,
    queue_depth,
    write_config,
)


async def complete(names: Names, count: int = 1, **fields: Any) -> list[JobResult]:
    """``count`` jobs one after another, each answered before the next is sent."""
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        return [
            await client.complete(
                job=make_job([{"role": "user", "content": f"q{i}"}], **fields), timeout_s=30
            )
            for i in range(count)
        ]


async def test_failures_in_a_row_open_the_circuit_and_a_trial_call_decides(
    redis: Redis, names: Names, fresh_views: None
) -> None:
    config = CircuitConfig(failures=3, open_s=1.0)  # long enough to read it open on a slow box
    worker, scheduler = Circuits(redis, names), Circuits(redis, names)  # two processes' views
    assert not await worker.failed("p", config, 2)
    assert (await scheduler.view("p")).state(3) is CircuitState.CLOSED

    assert await worker.failed("p", config)  # the third in a row opens it ...
    assert not await worker.failed("p", config)  # ... once: a call already out adds to it
    view = await scheduler.view("p")
    assert view.state(3) is CircuitState.OPEN and 0 < view.open_s_left() <= 1.0
    assert view.failures == 4

    await asyncio.sleep(1.05)
    assert (await scheduler.view("p")).state(3) is CircuitState.HALF_OPEN
    assert await worker.failed("p", config)  # a failed trial opens it again at once
    assert (await worker.view("p")).state(3) is CircuitState.OPEN

    await asyncio.sleep(1.05)
    await worker.succeeded("p")  # a trial that succeeds closes it
    assert await redis.exists(names.circuit("p")) == 0
    assert not await worker.failed("p", config, 2)  # and the count starts again from 0


async def test_a_provider_failing_in_a_row_is_routed_around_while_its_circuit_is_open(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider, redis: Redis, fresh_views: None
) -> None:
    # "down" is the cheaper: routing picks it while its circuit is closed. Nothing listens on its
    # port, so each call fails at once (a refused connection is a server error).
    down = dead_provider("down", max_attempts=1, circuit={"failures": 2, "open_s": 60})
    config = cheap_then_dear(tmp_path, mock, down, "up")
    async with pipeline(config):
        failed_over = await complete(names, 2, model="m")
        routed_around = await complete(names, 3, model="m")

    def tried(result: JobResult) -> list[tuple[str, str | None]]:
        return [(a.provider, a.error_code) for a in result.attempts]

    # The first two failed at "down" (and failed over); then its circuit opened: no more tries.
    assert [tried(r) for r in failed_over] == [[("down", "server_error"), ("up", None)]] * 2
    assert [tried(r) for r in routed_around] == [[("up", None)]] * 3
    assert {r.status.value for r in [*failed_over, *routed_around]} == {"succeeded"}
    assert mock.stats()["calls"] == 5
    circuit = await redis.hgetall(names.circuit("down"))
    assert int(circuit[b"failures"]) == 2 and int(circuit[b"open_until"]) > 0


async def test_jobs_queued_for_a_provider_whose_circuit_opened_are_answered_without_a_call(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis: Redis,
    fresh_views: None,
) -> None:
    providers = [{"id": "p", "circuit": {"failures": 1, "open_s": 60}}]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers))
    channel = await amqp.channel()
    results = await channel.declare_queue(f"{names.namespace}.circuit-results", exclusive=True)
    async with pipeline(config, workers=[], accountant=False):  # routed while it was closed
        for i in range(3):
            job = make_job([{"role": "user", "content": f"q{i}"}], model="gpt-4o-mini")
            message = aio_pika.Message(job.model_dump_json().encode(), reply_to=results.name)
            await channel.default_exchange.publish(message, routing_key=names.jobs)

        async def all_queued() -> bool:
            return await queue_depth(amqp, names.provider("p")) == 3

        await eventually(all_queued, 20, "3 jobs in the provider queue")

    assert await Circuits(redis, names).failed("p", CircuitConfig(failures=1, open_s=60))
    answers: list[dict[str, Any]] = []
    async with pipeline(config), results.iterator(timeout=30) as messages:
        async for message in messages:
            await message.ack()
            answers.append(json.loads(message.body))
            if len(answers) == 3:
                break
        [rejected] = await complete(names, model="gpt-4o-mini")  # routing drops it now
    await channel.close()

    for answer in answers:
        assert answer["status"] == "failed"
        [refused] = answer["attempts"]  # no call: nothing else to try, so no failover either
        assert (refused["provider"], refused["duration_ms"]) == ("p", 0)
        assert answer["error"]["code"] == "provider_unavailable"
        assert 0 < answer["error"]["retry_after"] <= 60
    assert rejected.status.value == "rejected" and rejected.error is not None
    assert rejected.error.code.value == "no_provider_available"
    assert "circuit open" in rejected.error.message
    assert rejected.error.retry_after is not None and 0 < rejected.error.retry_after <= 60
    assert mock.stats()["calls"] == 0


async def test_a_half_open_circuit_lets_one_trial_call_through_and_its_success_closes_it(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider, redis: Redis, fresh_views: None
) -> None:
    providers = [{"id": "p", "circuit": {"failures": 1, "open_s": 0.2}}]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers))
    assert await Circuits(redis, names).failed("p", CircuitConfig(failures=1, open_s=0.2))
    await asyncio.sleep(0.3)  # past open_s: half-open
    mock.configure(latency_ms=2000)  # the trial is still out when the second job comes
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            jobs = [
                make_job([{"role": "user", "content": f"q{i}"}], model="gpt-4o-mini")
                for i in range(2)
            ]
            results = await asyncio.gather(*(client.complete(job=j, timeout_s=30) for j in jobs))
    outcomes = sorted((r.status.value, r.error and r.error.code.value) for r in results)
    assert outcomes == [("failed", "provider_unavailable"), ("succeeded", None)]
    assert mock.stats()["calls"] == 1
    assert await redis.exists(names.circuit("p")) == 0  # closed by the trial


async def test_without_redis_a_circuit_lapses_to_closed_and_no_job_waits_on_it(
    names: Names, fresh_views: None
) -> None:
    """A breaker must not stop the calls it guards: with Redis gone nothing could close an open
    circuit, so its view lapses to closed when its open time ends; a success closes it here
    even if Redis cannot be told; a job waits at most READ_WAIT_S for a read."""
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        breaker = Circuits(unreachable, names)
        assert (await breaker.view("p")).state(1) is CircuitState.CLOSED  # never read: closed
        breaker._views["p"] = CircuitView(5, 200, time.monotonic())  # last read: open 0.2 s
        assert (await breaker.view("p")).state(5) is CircuitState.OPEN  # the read failed
        await asyncio.sleep(0.25)
        assert (await breaker.view("p")).state(5) is CircuitState.CLOSED  # not half-open
        breaker._views["p"] = CircuitView(5, 0, time.monotonic())
        with pytest.raises(RedisError):
            await breaker.succeeded("p")
        assert breaker.cached("p").state(5) is CircuitState.CLOSED
    finally:
        await unreachable.aclose()


async def test_a_redis_that_never_answers_does_not_hold_a_job_and_the_last_view_stands(
    names: Names, fresh_views: None
) -> None:
    """A server that accepts the connection and never replies (a stuck Redis): the view comes
    back (bounded here by 2 s; the code waits READ_WAIT_S) and it is the last one read."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stuck = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        breaker = Circuits(stuck, names)
        breaker._views["p"] = CircuitView(5, 60_000, time.monotonic())  # last read: open 60 s
        view = await asyncio.wait_for(breaker.view("p"), 2)
        assert view.state(5) is CircuitState.OPEN and view.open_s_left() > 50
        await asyncio.wait_for(breaker.view("p"), 2)  # the read still out: shared, not repeated
    finally:
        await stuck.aclose()
        server.close()
        await server.wait_closed()

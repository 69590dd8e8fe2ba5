"""The spine, end to end: producer → RabbitMQ → scheduler → worker → mock provider → reply queue,
with usage and cost landing in Postgres. Real RabbitMQ, Postgres and mock provider."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.core.config import load_config
from broker.core.names import DIRECT_REPLY_TO, HEADER_KEY, HEADER_TRACEPARENT, Names
from mock_provider import expected_completion, prompt_tokens
from tests.conftest import AMQP_URL, REDIS_URL, MockProvider, eventually, queue_depth, write_config
from workers.layers import GlobalLease

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def job_body(job_id: str, content: str, **fields: Any) -> bytes:
    job = {
        "schema_version": 1,
        "job_id": job_id,
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        **fields,
    }
    return json.dumps(job).encode()


async def usage_rows(pg: asyncpg.Connection, job_ids: list[str]) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT * FROM usage WHERE job_id = ANY($1::text[]) ORDER BY job_id", job_ids
    )


async def test_a_job_published_with_plain_aio_pika_gets_its_answer_and_its_usage_row(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = f"plain-{uuid.uuid4()}"
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers in Europe."},
    ]
    body = json.dumps(
        {"schema_version": 1, "job_id": job_id, "model": "gpt-4o-mini", "messages": messages}
    ).encode()
    async with pipeline(load_config(config_file)):
        channel = await amqp.channel()
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            replies.put_nowait(message)

        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(on_reply, no_ack=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=DIRECT_REPLY_TO, correlation_id="corr-1", priority=5),
            routing_key=names.jobs,
        )
        reply = await asyncio.wait_for(replies.get(), 20)
        await channel.close()

    assert reply.correlation_id == "corr-1"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    result = json.loads(reply.body)
    text, finish_reason = expected_completion(messages)
    assert result["schema_version"] == 1
    assert result["job_id"] == job_id
    assert result["status"] == "succeeded"
    assert result["provider"] == "mock"
    assert result["response"]["object"] == "chat.completion"
    assert result["response"]["choices"][0]["message"]["content"] == text
    assert result["response"]["choices"][0]["finish_reason"] == finish_reason
    prompt = prompt_tokens(messages)
    completion = result["usage"]["completion_tokens"]
    assert result["usage"]["prompt_tokens"] == prompt
    assert result["usage"]["total_tokens"] == prompt + completion
    expected_cost = (Decimal("0.15") * prompt + Decimal("0.60") * completion) / 1_000_000
    assert Decimal(result["cost_usd"]) == expected_cost.quantize(Decimal("1e-9"))

    async def recorded() -> bool:
        return len(await usage_rows(pg, [job_id])) == 1

    await eventually(recorded, 10, "the usage row")
    [row] = await usage_rows(pg, [job_id])
    assert (row["provider"], row["model"], row["attempt"]) == ("mock", "gpt-4o-mini", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["cost_usd"] == expected_cost.quantize(Decimal("1e-9"))
    job_row = await pg.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    assert job_row is not None
    assert (job_row["status"], job_row["provider"], job_row["attempts"]) == ("succeeded", "mock", 1)
    assert mock.stats()["calls"] == 1


async def test_high_priority_jobs_finish_before_low_ones(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, [{"id": "serial", "concurrency": 1}])
    )
    channel = await amqp.channel()
    results = await channel.declare_queue(f"{names.namespace}.prio-results", exclusive=True)
    # Queue every job while no worker runs: the scheduler moves them to the provider queue.
    async with pipeline(config, workers=[], accountant=False):
        for i in range(50):
            # A low job says its priority in the body only, a high one in the AMQP property only.
            low = aio_pika.Message(
                job_body(f"low-{i}", f"low job {i}", priority=1), reply_to=results.name
            )
            high = aio_pika.Message(
                job_body(f"high-{i}", f"high job {i}"), priority=8, reply_to=results.name
            )
            for message in (low, high):
                await channel.default_exchange.publish(message, routing_key=names.jobs)

        async def all_parked() -> bool:
            return await queue_depth(amqp, names.provider("serial")) == 100

        await eventually(all_parked, 20, "100 jobs in the provider queue")

    order: list[str] = []
    async with (
        pipeline(config, scheduler=False, accountant=False),
        results.iterator(timeout=30) as messages,
    ):
        async for message in messages:
            await message.ack()
            order.append(json.loads(message.body)["job_id"])
            if len(order) == 100:
                break
    await channel.close()
    assert [job_id.split("-")[0] for job_id in order] == ["high"] * 50 + ["low"] * 50
    assert mock.stats()["max_in_flight"] == 1


async def test_the_pool_never_has_more_calls_in_flight_than_its_concurrency(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    config = load_config(
        write_config(tmp_path / "p.yaml", mock, [{"id": "capped", "concurrency": 3}])
    )
    mock.configure(latency_ms=150)
    async with pipeline(config, accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            results = await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": f"question {i}"}],
                        model="gpt-4o-mini",
                        timeout_s=30,
                    )
                    for i in range(24)
                )
            )
    assert [r.status.value for r in results] == ["succeeded"] * 24
    stats = mock.stats()
    assert stats["calls"] == 24
    assert stats["max_in_flight"] == 3


async def test_the_next_call_starts_while_a_finished_job_waits_for_its_confirms(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """At concurrency 1, a job whose call is done but whose result and accounting event are not
    yet confirmed no longer keeps the next job's call from starting."""
    from workers.pool import WorkerPool

    config = load_config(write_config(tmp_path / "p.yaml", mock, [{"id": "one", "concurrency": 1}]))
    async with pipeline(config, accountant=False) as services:
        [pool] = [s for s in services if isinstance(s, WorkerPool)]
        finish = pool.outcomes.finish
        held: list[str] = []
        release = asyncio.Event()

        async def slow_finish(message: Any, job: Any, result: Any, usage: Any, **kw: Any) -> None:
            if not held:  # the first job to finish waits, as for a slow fsync
                held.append(job.job_id)
                await release.wait()
            await finish(message, job, result, usage, **kw)

        pool.outcomes.finish = slow_finish  # type: ignore[method-assign]
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            calls = [
                asyncio.create_task(
                    client.complete(
                        [{"role": "user", "content": f"q {i}"}], model="gpt-4o-mini", timeout_s=30
                    )
                )
                for i in range(2)
            ]

            async def both_called() -> bool:
                return bool(mock.stats()["calls"] == 2)

            await eventually(both_called, 10, "the second call while the first job finishes")
            assert held and not release.is_set()
            release.set()
            results = await asyncio.gather(*calls)
    assert [r.status.value for r in results] == ["succeeded"] * 2
    assert held[0] in {r.job_id for r in results}
    assert mock.stats()["max_in_flight"] == 1


async def test_the_client_reads_a_batch_back_from_a_durable_results_queue(
    names: Names, config_file: Path, pipeline: Any, mock: MockProvider
) -> None:
    from broker.client import make_job

    async with pipeline(load_config(config_file), accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            queue = await client.open_results("batch-1")
            jobs = [
                make_job([{"role": "user", "content": f"item {i}"}], model="gpt-4o-mini")
                for i in range(10)
            ]
            for job in jobs:
                await client.submit(job, results_queue=queue)
            received: dict[str, str] = {}
            async for result in client.results(queue):
                assert result.response is not None
                received[result.job_id] = result.response.choices[0].message.content or ""
                if len(received) == len(jobs):
                    break
            await client.delete_results(queue)
    for job in jobs:
        expected, _ = expected_completion([m.model_dump(exclude_none=True) for m in job.messages])
        assert received[job.job_id] == expected


async def test_a_result_the_consumer_failed_on_is_read_again_and_each_call_of_a_job_answered(
    names: Names, config_file: Path, pipeline: Any, mock: MockProvider
) -> None:
    """``results``: a consumer that raises while handling a result gets it again on its next
    read (the result was neither acked nor marked seen). ``complete``: two calls sending the same
    job (a retry after a timeout) each get the answer to their own message."""
    from broker.client import make_job

    async with pipeline(load_config(config_file), accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            queue = await client.open_results("again")
            job = make_job([{"role": "user", "content": "read me twice"}], model="gpt-4o-mini")
            await client.submit(job, results_queue=queue)
            with pytest.raises(RuntimeError, match="consumer failed"):
                async for _ in client.results(queue):
                    raise RuntimeError("consumer failed")
            again = await asyncio.wait_for(anext(aiter(client.results(queue))), 10)
            assert again.job_id == job.job_id
            await client.delete_results(queue)

            same = make_job([{"role": "user", "content": "sent twice"}], model="gpt-4o-mini")
            first, second = await asyncio.gather(
                client.complete(job=same, timeout_s=10), client.complete(job=same, timeout_s=10)
            )
    assert first.job_id == second.job_id == same.job_id
    assert first.status.value == second.status.value == "succeeded"


async def test_a_call_whose_global_lease_cannot_be_returned_still_succeeds(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing as the worker returns a global lease (the call done and paid for) used to
    turn the success into an internal error, with no usage recorded; the lease expires."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from broker.state.leases import LeaseSemaphore

    async def unreachable(self: LeaseSemaphore, lease: Any) -> None:
        raise RedisConnectionError("Redis is away")

    monkeypatch.setattr(LeaseSemaphore, "release", unreachable)
    path = write_config(
        tmp_path / "providers.yaml",
        mock,
        [{"id": "mock", "concurrency": 2, "global_concurrency": 2}],
    )
    async with pipeline(load_config(path), accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            result = await client.complete(
                [{"role": "user", "content": "lease"}], model="gpt-4o-mini", timeout_s=20
            )
    assert result.status.value == "succeeded" and result.error is None
    assert mock.stats()["calls"] == 1


async def test_a_global_lease_is_renewed_for_as_long_as_its_call_runs(
    names: Names, tmp_path: Path, mock: MockProvider
) -> None:
    """A lease lasts timeout_s x max_attempts + 2 s (3 s here), but timeout_s bounds each read,
    not the call: a stream can run longer. The lease used to expire under the call, and another
    worker could take the provider's one slot."""
    from workers.pool import WorkerPool

    provider = {"id": "mock", "global_concurrency": 1, "timeout_s": 1, "max_attempts": 1}
    config = load_config(write_config(tmp_path / "p.yaml", mock, [provider]))
    pool = WorkerPool(AMQP_URL, config, names, "mock", redis_url=REDIS_URL)
    leases = pool._clients.current.leases
    assert leases is not None and leases.lease_s == 3
    try:
        async with GlobalLease("test-holder", "test").hold(leases, None):
            await asyncio.sleep(4.5)  # a call outlasting its lease
            assert await leases.held() == 1
            assert await leases.acquire("another-worker") is None
        assert await leases.held() == 0  # returned when the call ended
    finally:
        await pool.stop(grace_s=1)


async def test_every_provider_type_serves_jobs_through_the_pipeline_with_exact_usage(
    names: Names, tmp_path: Path, pipeline: Any, pg: asyncpg.Connection, mock: MockProvider
) -> None:
    prices = {"input": 1, "output": 2, "max_tokens": 256}
    providers = [
        {"id": "p-openai", "type": "openai", "models": {"m-openai": prices}},
        {"id": "p-anthropic", "type": "anthropic", "models": {"m-anthropic": prices}},
        {
            "id": "p-gemini",
            "type": "gemini",
            "base_url": f"{mock.base_url}/v1beta",
            "models": {"m-gemini": prices},
        },
        {"id": "p-compat", "type": "openai_compatible", "models": {"m-compat": prices}},
    ]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers))
    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Which planet has the most moons?"},
    ]
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            results = await asyncio.gather(
                *(
                    client.complete(messages, model=f"m-{kind}", timeout_s=30)
                    for kind in ("openai", "anthropic", "gemini", "compat")
                )
            )
    text, _ = expected_completion(messages)
    assert [r.provider for r in results] == ["p-openai", "p-anthropic", "p-gemini", "p-compat"]
    for result in results:
        assert result.status.value == "succeeded", result.error
        assert result.response is not None
        assert result.response.choices[0].message.content == text
        assert result.usage is not None
        assert result.usage.prompt_tokens == prompt_tokens(messages)

    job_ids = [r.job_id for r in results]

    async def recorded() -> bool:
        return len(await usage_rows(pg, job_ids)) == 4

    await eventually(recorded, 10, "four usage rows")
    rows = {r["provider"]: r for r in await usage_rows(pg, job_ids)}
    for result in results:
        assert result.usage is not None and result.provider is not None
        row = rows[result.provider]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
        )
        assert (
            row["cost_usd"]
            == Decimal(result.usage.prompt_tokens + 2 * result.usage.completion_tokens) / 1_000_000
        )


async def test_a_call_in_a_discount_window_is_priced_at_the_discount_in_its_result_and_row(
    names: Names, tmp_path: Path, pipeline: Any, pg: asyncpg.Connection, mock: MockProvider
) -> None:
    """One price per call: routing chose by the discounted price, and the result and the usage
    row carry the same figure even when the accountant writes the row after a reload that
    changed the price (it used to price the row again by its own config). A window with start
    == end covers the whole day."""
    half = {"start": "00:00", "end": "00:00", "multiplier": "0.5"}
    model = {"input": 1, "output": 2, "discounts": [half]}
    path = write_config(
        tmp_path / "providers.yaml", mock, [{"id": "mock", "models": {"gpt-4o-mini": model}}]
    )
    config = load_config(path)
    async with pipeline(config, accountant=False):  # the usage waits in its queue
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            result = await client.complete(
                [{"role": "user", "content": "half price?"}], model="gpt-4o-mini", timeout_s=30
            )
    assert result.usage is not None
    half_price = (
        Decimal(result.usage.prompt_tokens + 2 * result.usage.completion_tokens) / 2_000_000
    ).quantize(Decimal("0.000000001"))
    assert result.cost_usd == half_price

    dearer = {"gpt-4o-mini": {"input": 10, "output": 20}}
    reloaded = load_config(
        write_config(tmp_path / "dearer.yaml", mock, [{"id": "mock", "models": dearer}])
    )
    assert reloaded.version != config.version

    async def recorded() -> bool:
        return len(await usage_rows(pg, [result.job_id])) == 1

    async with pipeline(reloaded, scheduler=False, workers=[]):
        await eventually(recorded, 10, "the usage row")
    [row] = await usage_rows(pg, [result.job_id])
    assert row["cost_usd"] == result.cost_usd == half_price
    assert row["price_version"] == config.version


async def test_a_job_reaches_its_provider_queue_in_the_delivery_mode_its_producer_chose(
    amqp: AbstractRobustConnection, names: Names, config_file: Path, pipeline: Any
) -> None:
    """RPC jobs (``complete``) travel transient, since their answer dies with the caller's
    channel; batch jobs (``submit``) and AMQP producers' persistent jobs stay persistent. The
    trace context goes along; the virtual key stays behind (a job whose deadline passes in the
    provider queue is dead-lettered by RabbitMQ with its headers)."""
    from broker.client import make_job

    provider_queue = names.provider("mock")
    async with pipeline(load_config(config_file), workers=[], accountant=False):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            rpc_job = make_job([{"role": "user", "content": "rpc"}], model="gpt-4o-mini")
            waiting = asyncio.create_task(client.complete(job=rpc_job, timeout_s=60))
            results = await client.open_results("modes")
            batch_job = make_job([{"role": "user", "content": "batch"}], model="gpt-4o-mini")
            await client.submit(batch_job, results_queue=results)
            channel = await amqp.channel(publisher_confirms=True)
            for job_id, mode in (
                ("native-persistent", aio_pika.DeliveryMode.PERSISTENT),
                ("native-default", None),
            ):
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        job_body(job_id, "native"),
                        delivery_mode=mode,
                        headers={HEADER_KEY: "sk-virtual-secret", HEADER_TRACEPARENT: TRACE},
                    ),
                    routing_key=names.jobs,
                )

            async def all_forwarded() -> bool:
                return await queue_depth(amqp, provider_queue) == 4

            await eventually(all_forwarded, 10, "four jobs in the provider queue")
            modes: dict[str, aio_pika.DeliveryMode] = {}
            headers: dict[str, dict[str, Any]] = {}
            queue = await channel.get_queue(provider_queue)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                job_id = json.loads(message.body)["job_id"]
                modes[job_id] = message.delivery_mode
                headers[job_id] = dict(message.headers or {})
            waiting.cancel()
            await client.delete_results(results)
            await channel.close()

    assert modes == {
        rpc_job.job_id: aio_pika.DeliveryMode.NOT_PERSISTENT,
        batch_job.job_id: aio_pika.DeliveryMode.PERSISTENT,
        "native-persistent": aio_pika.DeliveryMode.PERSISTENT,
        "native-default": aio_pika.DeliveryMode.NOT_PERSISTENT,
    }
    assert headers["native-persistent"] == headers["native-default"] == {HEADER_TRACEPARENT: TRACE}

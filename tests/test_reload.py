"""Hot reload against the real services: a config change reaches running services within a
second without losing a job; invalid versions are refused; versions are recorded once and can be
rolled back from the CLI; a version published on ``<ns>.config`` by another process is applied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.config import Config, load_config
from broker.core.names import Names
from broker.transport.reload import ConfigReloader, Reloadable
from broker.transport.runtime import Service
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    MockProvider,
    consumer_count,
    eventually,
    process_env,
    queue_depth,
    write_config,
)
from tests.test_cli import run_cli
from tests.test_processes import Processes
from workers.pools import WorkerPools

MODEL = "gpt-4o-mini"
NEW_PRICES = {MODEL: {"input": 1, "output": 2}}


def providers(names: Names, *ids: str, **extra: Any) -> list[dict[str, Any]]:
    # A header unique to the test keeps its digests apart from other tests' in the session's
    # database (the digest covers the content, and tests share the mock's URL).
    return [
        {"id": i, "concurrency": 4, "headers": {"x-test": names.namespace}, **extra} for i in ids
    ]


def write(path: Path, mock: MockProvider, names: Names, serve: str, *ids: str, **extra: Any) -> str:
    """Write a config whose public model is served by ``serve``; returns the text written."""
    write_config(path, mock, providers(names, *ids, **extra), models={MODEL: [serve]})
    return path.read_text()


@asynccontextmanager
async def reloading(
    path: Path, names: Names, database_url: str | None, services: list[Any]
) -> AsyncIterator[ConfigReloader]:
    """A config reloader applying to ``services``, as each ``switchyard`` process runs one."""
    reloader = ConfigReloader(path, AMQP_URL, names, load_config(path), database_url=database_url)
    for service in services:
        subscriber: Reloadable = service
        reloader.subscribe(subscriber.apply)
    await reloader.start()
    try:
        yield reloader
    finally:
        await reloader.stop()


class JobFlow:
    """A producer sending a job every ``every_s`` to the jobs queue, with its own results queue
    that counts every result per job id (duplicates included)."""

    def __init__(self, amqp: AbstractRobustConnection, names: Names, every_s: float) -> None:
        self.amqp = amqp
        self.names = names
        self.every_s = every_s
        self.sent: dict[str, float] = {}  # job id -> time.time() when published
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._sender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobFlow:
        self.channel = await self.amqp.channel(publisher_confirms=True)
        self.queue = await self.channel.declare_queue(
            f"{self.names.namespace}.reload-results.{uuid.uuid4().hex[:6]}", exclusive=True
        )
        await self.queue.consume(self._on_result)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.channel.close()

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        result = json.loads(message.body)
        self.results[result["job_id"]].append(result)
        await message.ack()

    async def send(self, count: int = 1) -> list[str]:
        ids = []
        for _ in range(count):
            job_id = f"reload-{uuid.uuid4().hex[:12]}"
            body = {
                "schema_version": 1,
                "job_id": job_id,
                "model": MODEL,
                "messages": [{"role": "user", "content": f"question {job_id}"}],
            }
            self.sent[job_id] = time.time()
            await self.channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), reply_to=self.queue.name),
                routing_key=self.names.jobs,
            )
            ids.append(job_id)
        return ids

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.send()
                await asyncio.sleep(self.every_s)

        self._sender = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None

    async def all_answered(self, timeout_s: float, job_ids: list[str] | None = None) -> None:
        wanted = list(self.sent) if job_ids is None else job_ids

        async def done() -> bool:
            return all(self.results.get(j) for j in wanted)

        await eventually(done, timeout_s, f"results for {len(wanted)} jobs")

    def provider(self, job_id: str) -> str:
        [result] = self.results[job_id]
        assert result["status"] == "succeeded", result
        return str(result["provider"])


async def versions(pg: asyncpg.Connection, *digests: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT * FROM config_versions WHERE digest = ANY($1::text[]) ORDER BY id", list(digests)
    )


async def test_moving_a_model_between_providers_while_jobs_flow_loses_no_job(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    mock.configure(latency_ms=30)
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha", "beta")
    before = load_config(path)
    async with (
        pipeline(before) as services,
        reloading(path, names, database_url, services) as reloader,
        JobFlow(amqp, names, every_s=0.01) as flow,
    ):
        flow.start()
        await asyncio.sleep(1.0)
        # Both entries change too (timeout, prices): calls in flight finish on the old HTTP
        # client, and the calls that start after the change are priced by the new version.
        write(path, mock, names, "beta", "alpha", "beta", timeout_s=20, models=NEW_PRICES)
        written_at = time.time()
        await asyncio.sleep(2.0)
        await flow.stop()
        await flow.all_answered(30)
        after = reloader.config

    assert after.version != before.version
    assert after.candidates(MODEL)[0][0].id == "beta"
    # Every job sent got exactly one result, and it succeeded.
    assert len(flow.sent) > 100
    assert {job_id: len(flow.results[job_id]) for job_id in flow.sent} == dict.fromkeys(
        flow.sent, 1
    )
    routed = {job_id: flow.provider(job_id) for job_id in flow.sent}
    last_alpha = max(flow.sent[j] for j, p in routed.items() if p == "alpha")
    first_beta = min(flow.sent[j] for j, p in routed.items() if p == "beta")
    # New jobs go to beta within 1 s of the write (sent any later, they never went to alpha).
    print(f"switch: last alpha job sent {last_alpha - written_at:.3f} s after the write")
    assert last_alpha - written_at < 1.0, last_alpha - written_at
    assert first_beta > written_at - 0.2
    assert [p for j, p in routed.items() if flow.sent[j] > written_at + 1.0] != []
    assert {p for j, p in routed.items() if flow.sent[j] > written_at + 1.0} == {"beta"}
    rows = await versions(pg, before.version, after.version)
    assert [(r["digest"], r["source"]) for r in rows] == [
        (before.version, "file"),
        (after.version, "file"),
    ]

    async def recorded() -> bool:
        count = await pg.fetchval(
            "SELECT count(*) FROM usage WHERE job_id = ANY($1::text[])", list(flow.sent)
        )
        return bool(count == len(flow.sent))

    await eventually(recorded, 20, "a usage row per job")
    usage = await pg.fetch("SELECT * FROM usage WHERE job_id = ANY($1::text[])", list(flow.sent))
    prices = {before.version: (Decimal("0.15"), Decimal("0.60")), after.version: (1, 2)}
    for row in usage:
        price_in, price_out = prices[row["price_version"]]
        expected = (price_in * row["prompt_tokens"] + price_out * row["completion_tokens"]) / 10**6
        assert row["cost_usd"] == Decimal(expected).quantize(Decimal("1e-9"))
    by_provider = defaultdict(set)
    for row in usage:
        by_provider[row["provider"]].add(row["price_version"])
    assert by_provider["beta"] == {after.version}
    assert before.version in by_provider["alpha"]


async def test_an_invalid_change_is_refused_and_the_running_version_keeps_serving(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha", "beta")
    config = load_config(path)
    caplog.set_level(logging.ERROR, logger="broker.transport.reload")
    channel = await amqp.channel()
    async with (
        pipeline(config) as services,
        reloading(path, names, database_url, services) as reloader,
        JobFlow(amqp, names, every_s=0.01) as flow,
    ):
        published = await channel.declare_queue(exclusive=True)
        await published.bind(names.config)
        rows_before = await pg.fetchval("SELECT count(*) FROM config_versions")
        bad = [
            ("providers:\n  - id: alpha\n   type: [openai\n", "not valid YAML or JSON"),
            (
                path.read_text().replace("- alpha", "- nowhere"),
                "models.gpt-4o-mini: unknown provider 'nowhere'",
            ),
        ]
        for text, reason in bad:
            caplog.clear()
            path.write_text(text)

            async def refused(reason: str = reason) -> bool:
                return any(
                    str(path) in r.getMessage() and reason in r.getMessage() for r in caplog.records
                )

            await eventually(refused, 2, f"the reloader to refuse: {reason}")
            assert f"keeping config version {config.version}" in caplog.text
            job_ids = await flow.send(5)
            await flow.all_answered(20, job_ids)
            assert {flow.provider(j) for j in job_ids} == {"alpha"}
            assert reloader.config.version == config.version
        rows_after = await pg.fetchval("SELECT count(*) FROM config_versions")
    assert rows_after == rows_before
    assert await published.get(fail=False) is None  # nothing went on the config exchange
    await channel.close()


async def test_versions_are_recorded_once_listed_and_rolled_back_from_the_cli(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    path = tmp_path / "providers.yaml"
    # Comments and layout are part of the text a rollback must restore byte for byte.
    old_text = "# the first version\r\n" + write(path, mock, names, "alpha", "alpha", "beta")
    path.write_text(old_text, newline="")
    old = load_config(path)
    env = process_env(names, database_url, path)
    async with (
        pipeline(old) as services,
        reloading(path, names, database_url, services) as reloader,
        JobFlow(amqp, names, every_s=0.01) as flow,
    ):
        write(path, mock, names, "beta", "alpha", "beta")
        new = load_config(path)

        async def applied() -> bool:
            return reloader.config.version == new.version

        await eventually(applied, 10, "the new version to apply")
        # The same version written again, and one only touched, are not new versions.
        path.write_text(path.read_text())
        await asyncio.sleep(0.6)
        rows = await versions(pg, old.version, new.version)
        assert [(r["digest"], r["source"]) for r in rows] == [
            (old.version, "file"),
            (new.version, "file"),
        ]
        assert rows[0]["content"] == old_text
        old_id, new_id = rows[0]["id"], rows[1]["id"]

        code, output = await run_cli(env, "config", "history", "--limit", "5")
        assert code == 0, output
        lines = [line for line in output.splitlines() if "│" in line]
        cells = [[c.strip() for c in line.split("│") if c.strip()] for line in lines]
        listed = [c[:3] for c in cells if c and c[0].isdigit()]
        assert listed[:2] == [
            [str(new_id), new.version, "file"],
            [str(old_id), old.version, "file"],
        ]

        flow.start()
        code, output = await run_cli(env, "config", "rollback", str(old_id))
        assert code == 0, output
        assert f"rolled back to config version {old_id}" in output
        written_at = path.stat().st_mtime
        await asyncio.sleep(1.5)
        await flow.stop()
        await flow.all_answered(30)
        assert reloader.config.version == old.version

    assert path.read_bytes() == old_text.encode()
    routed = {job_id: flow.provider(job_id) for job_id in flow.sent}
    assert {len(flow.results[j]) for j in flow.sent} == {1}
    late = {p for j, p in routed.items() if flow.sent[j] > written_at + 1.0}
    assert late == {"alpha"}
    rows = await versions(pg, old.version, new.version)
    assert [(r["id"], r["source"]) for r in rows] == [(old_id, "rollback"), (new_id, "file")]
    assert rows[0]["last_applied_at"] > rows[1]["last_applied_at"]

    code, output = await run_cli(env, "config", "history", "--limit", "1")
    assert code == 0, output
    assert old.version in output and "rollback" in output and new.version not in output


async def test_a_version_published_by_another_process_is_applied_by_a_running_scheduler(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "providers.yaml"
    file_text = write(path, mock, names, "alpha", "alpha", "beta")
    config = load_config(path)
    other = tmp_path / "elsewhere.yaml"
    other_text = write(other, mock, names, "beta", "alpha", "beta")
    elsewhere = load_config(other)
    channel = await amqp.channel()
    caplog.set_level(logging.ERROR, logger="broker.transport.reload")
    # The scheduler alone runs with the reloader (no database: it records nothing); the workers
    # run without one, as on another host that has not heard of the new version.
    async with (
        pipeline(config, accountant=False) as services,
        reloading(path, names, None, [s for s in services if s.name == "scheduler"]) as reloader,
        JobFlow(amqp, names, every_s=0.01) as flow,
    ):
        exchange = await channel.get_exchange(names.config)  # declared by the services
        refused = {"digest": "0" * 16, "content": "providers: []\n", "source": "file"}
        for body in (b"{not json", json.dumps(refused).encode()):
            await exchange.publish(aio_pika.Message(body), routing_key="")

        async def both_refused() -> bool:
            return caplog.text.count("refused a config version") == 2

        await eventually(both_refused, 2, "two refusals")
        assert "providers: List should have at least 1 item" in caplog.text
        assert reloader.config.version == config.version

        message = {"digest": elsewhere.version, "content": other_text, "source": "file"}
        await exchange.publish(
            aio_pika.Message(json.dumps(message).encode(), delivery_mode=2), routing_key=""
        )

        async def applied() -> bool:
            return reloader.config.version == elsewhere.version

        await eventually(applied, 10, "the published version to apply")
        await asyncio.sleep(0.05)
        job_ids = await flow.send(10)
        await flow.all_answered(20, job_ids)
        assert {flow.provider(j) for j in job_ids} == {"beta"}
    assert path.read_text() == file_text  # the file on this host is not rewritten
    assert await versions(pg, elsewhere.version) == []  # this process has no database
    await channel.close()


async def test_a_bus_version_is_recorded_by_a_process_with_a_database(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha")
    other = tmp_path / "elsewhere.yaml"
    other_text = write(other, mock, names, "alpha", "alpha", timeout_s=5)
    elsewhere = load_config(other)
    async with reloading(path, names, database_url, []) as reloader:
        channel = await amqp.channel()
        message = {"digest": elsewhere.version, "content": other_text, "source": "file"}
        exchange = await channel.get_exchange(names.config)
        await exchange.publish(aio_pika.Message(json.dumps(message).encode()), routing_key="")

        async def recorded() -> bool:
            return len(await versions(pg, elsewhere.version)) == 1

        await eventually(recorded, 3, "the bus version to be recorded")
        assert reloader.config.version == elsewhere.version
        await channel.close()
    [row] = await versions(pg, elsewhere.version)
    assert (row["source"], row["content"]) == ("bus", other_text)


async def test_a_new_concurrency_changes_the_prefetch_and_the_slots(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    mock.configure(latency_ms=300)
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha", concurrency=2)
    async with (
        pipeline(load_config(path), accountant=False) as services,
        reloading(path, names, None, services) as reloader,
        JobFlow(amqp, names, every_s=0.01) as flow,
    ):
        first = await flow.send(12)
        await flow.all_answered(30, first)
        assert mock.stats()["max_in_flight"] == 2
        write(path, mock, names, "alpha", "alpha", concurrency=6)

        await eventually(_concurrency(reloader, 6), 10, "concurrency 6 to apply")
        mock.reset()
        mock.configure(latency_ms=300)
        second = await flow.send(24)
        await flow.all_answered(30, second)
        assert mock.stats()["max_in_flight"] == 6
        write(path, mock, names, "alpha", "alpha", concurrency=1)
        await eventually(_concurrency(reloader, 1), 10, "concurrency 1 to apply")
        mock.reset()
        mock.configure(latency_ms=100)
        third = await flow.send(6)
        await flow.all_answered(30, third)
        assert mock.stats()["max_in_flight"] == 1
    assert {len(flow.results[j]) for j in flow.sent} == {1}


def _concurrency(reloader: ConfigReloader, value: int) -> Any:
    async def check() -> bool:
        return reloader.config.providers[0].concurrency == value

    return check


async def test_a_removed_provider_drains_its_queue_and_an_added_one_gets_a_pool(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    database_url: str,
    mock: MockProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As ``switchyard up`` runs them: the worker pools follow the providers of the config."""
    mock.configure(latency_ms=100)
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "gone", "gone", concurrency=1)
    config = load_config(path)
    pools = WorkerPools(AMQP_URL, config, names, redis_url=REDIS_URL)
    caplog.set_level(logging.WARNING, logger="workers.pool")
    async with pipeline(config, workers=[]) as services:
        await pools.start()
        try:
            running: list[Service] = [*services, pools]
            async with (
                reloading(path, names, database_url, running),
                JobFlow(amqp, names, every_s=0.01) as flow,
            ):
                queued = await flow.send(20)

                async def backlog() -> bool:
                    return await queue_depth(amqp, names.provider("gone")) >= 10

                await eventually(backlog, 5, "a backlog in gone's queue")
                write(path, mock, names, "fresh", "fresh")

                async def drained() -> bool:
                    return await consumer_count(amqp, names.provider("gone")) == 0

                await flow.all_answered(30, queued)
                await eventually(drained, 5, "gone's pool to stop consuming its empty queue")
                later = await flow.send(10)
                await flow.all_answered(20, later)
                # Back in the config, its pool consumes again.
                write(path, mock, names, "gone", "fresh", "gone")

                async def consuming() -> bool:
                    return await consumer_count(amqp, names.provider("gone")) == 1

                await eventually(consuming, 2, "gone's pool to consume again")
                back = await flow.send(5)
                await flow.all_answered(20, back)
        finally:
            await pools.stop(grace_s=5)
    assert {flow.provider(j) for j in queued} == {"gone"}
    assert {flow.provider(j) for j in later} == {"fresh"}
    assert {flow.provider(j) for j in back} == {"gone"}
    assert {len(flow.results[j]) for j in flow.sent} == {1}
    assert "provider 'gone' is no longer in the config" in caplog.text
    # The accountant prices the drained provider's last calls at its last known prices.
    assert "no price for" not in caplog.text
    assert sorted(pools.pools) == ["fresh", "gone"]


async def test_config_check_validates_a_file(
    names: Names, tmp_path: Path, database_url: str, mock: MockProvider
) -> None:
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha")
    env = process_env(names, database_url, path)
    code, output = await run_cli(env, "config", "check", str(path))
    assert (code, output.strip()) == (0, f"valid, digest {load_config(path).version}")
    data = yaml.safe_load(path.read_text())
    data["providers"][0]["base_url"] = "not a url"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, output = await run_cli(env, "config", "check", str(bad))
    assert code == 2
    assert f"{bad}: invalid config" in output
    assert "providers.0.base_url: Input should be a valid URL" in output


async def test_switchyard_up_reloads_and_starts_a_pool_for_an_added_provider(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha")
    before = load_config(path)
    processes = Processes(process_env(names, database_url, path), tmp_path)
    try:
        processes.start("up")

        async def serving() -> bool:
            return (
                await consumer_count(amqp, names.jobs) == 1
                and await consumer_count(amqp, names.provider("alpha")) == 1
            )

        await eventually(serving, 30, "switchyard up to consume")

        async def started_version_recorded() -> bool:
            # Its reloader starts last (after the gateway): a file changed before that would
            # be the version it starts on, and the one it served first never recorded.
            return bool(await versions(pg, before.version))

        await eventually(started_version_recorded, 30, "switchyard up's reloader to start")
        async with JobFlow(amqp, names, every_s=0.01) as flow:
            first = await flow.send(3)
            await flow.all_answered(20, first)
            write(path, mock, names, "gamma", "alpha", "gamma")
            after = load_config(path)

            async def on_gamma() -> bool:
                [job_id] = await flow.send(1)
                await flow.all_answered(5, [job_id])
                return flow.provider(job_id) == "gamma"

            # How fast a version applies is the bench's business; here, that it does.
            await eventually(on_gamma, 10, "jobs to reach the added provider", interval_s=0)
    finally:
        # The version is recorded before `up` stops, however soon after applying it stops.
        processes.stop_all()
    assert {flow.provider(j) for j in first} == {"alpha"}
    assert {len(r) for r in flow.results.values()} == {1}
    rows = await versions(pg, before.version, after.version)
    assert [(r["digest"], r["source"]) for r in rows] == [
        (before.version, "file"),
        (after.version, "file"),
    ]
    assert [p.returncode for p in processes.running] == [0]


async def test_a_version_being_applied_is_recorded_even_if_the_process_stops_right_then(
    names: Names,
    tmp_path: Path,
    database_url: str,
    pg: asyncpg.Connection,
    mock: MockProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.core import config_store

    path = tmp_path / "providers.yaml"
    write(path, mock, names, "alpha", "alpha")
    applied = asyncio.Event()

    class Subscriber:
        async def apply(self, config: Config) -> None:
            applied.set()

    record = config_store.record

    async def slow_record(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.5)  # Postgres slow to commit as the process is told to stop
        await record(*args, **kwargs)

    monkeypatch.setattr(config_store, "record", slow_record)
    async with reloading(path, names, database_url, [Subscriber()]) as reloader:
        before = reloader.config
        write(path, mock, names, "beta", "alpha", "beta")
        after = load_config(path)
        await asyncio.wait_for(applied.wait(), 10)
    # reloading() stopped the reloader at once after the version was applied
    rows = await versions(pg, before.version, after.version)
    assert [r["digest"] for r in rows] == [before.version, after.version]

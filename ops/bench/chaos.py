"""The harness of the ``faults`` scenario (``faults.py``) and of ``tests/test_faults.py``.

One fault run gets a world of its own: a queue namespace (``faults-<random>``), a Postgres
database migrated by the project's migrations, a mock provider, and Switchyard's scheduler,
worker and accountant as real processes. Persistent batch jobs carry a virtual key with a
budget that never refuses (so its Redis counter exists to compare with the ledger). The results
queue is read raw, every message as it came; the books are the ledger, the mock provider's own
count of the calls it served, and the key's counter, read at one moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from procs import Proc, Procs, cli, free_port, wait_http
from redis.asyncio import Redis

from broker.client import SwitchyardClient, make_job
from broker.core.clock import utcnow
from broker.core.config import load_config
from broker.core.migrate import upgrade
from broker.core.names import Names
from broker.core.settings import Settings
from broker.core.windows import Period, window
from broker.transport.amqp import BROKER_FAILURES, PARK_DELAYS_S, declare_results_queue
from schemas import CompletionJob

__all__ = ["FULL", "KINDS", "SMALL", "Answer", "Answers", "Books", "Sizes", "Stage"]


@dataclass(frozen=True)
class Sizes:
    """How big a fault run is; ``FULL`` for ``faults.py``, ``SMALL`` for the test suite."""

    jobs: int = 2_000
    wave: int = 50  # jobs published together
    rate: float = 200.0  # jobs offered per second, below what the pipeline serves
    fault_at: float = 0.3  # the fault lands after this share of the waves
    concurrency: int = 16  # the worker's calls in flight
    latency_ms: float = 35.0  # the mock's, ± jitter_ms
    jitter_ms: float = 15.0
    max_tokens: int = 16
    timeout_s: float = 5.0  # the provider's
    settle_margin_s: float = 2.0  # SWITCHYARD_CALL_SETTLE_MARGIN_S: dead calls swept at 47 s
    rabbitmq_down_s: float = 5.0
    postgres_down_s: float = 60.0
    redis_down_s: float = 30.0
    provider_fault_s: float = 5.0
    answer_timeout_s: float = 180.0  # for every result, from the fault's end
    settle_timeout_s: float = 120.0  # for the books, from the last result


FULL = Sizes()
SMALL = Sizes(
    jobs=400,  # at the full run's pace, so as many jobs are in each process when the fault lands
    rabbitmq_down_s=2.0,
    postgres_down_s=8.0,
    redis_down_s=5.0,
    provider_fault_s=2.0,
    answer_timeout_s=60.0,
    settle_timeout_s=90.0,
)

KINDS: dict[str, tuple[str, ...]] = {
    "scheduler": ("scheduler",),
    "worker": ("worker", "--provider", "mock"),
    "accountant": ("accountant",),
}
"""The processes of a run by kind: each one's ``switchyard`` command."""


def _reconnecting(url: str) -> str:
    """The harness's own connections come back fast, so its clock of recovery is the pipeline's."""
    return f"{url}{'&' if '?' in url else '?'}reconnect_interval=0.5"


async def _admin_sql(dsn: str, sql: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """One message of the results queue; ``digest`` tells a redelivery from a second result."""

    job_id: str
    status: str
    code: str | None
    at: float  # time.monotonic() when it came
    digest: str


class Answers:
    """The raw results queue: every message as it came, no de-duplication, each acked on its
    own (so one the broker delivers again comes with the same bytes)."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.amqp_url, self.queue = amqp_url, queue
        self.by_job: dict[str, list[Answer]] = {}
        self.arrived = asyncio.Event()
        self.undecodable = 0
        self._connection: AbstractRobustConnection | None = None

    async def start(self, names: Names) -> None:
        self._connection = await aio_pika.connect_robust(_reconnecting(self.amqp_url))
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=500)
        await (await declare_results_queue(channel, names, self.queue)).consume(self._take)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _take(self, message: AbstractIncomingMessage) -> None:
        self.arrived.set()
        try:
            body = json.loads(message.body)
            code = (body.get("error") or {}).get("code")
            digest = hashlib.sha1(message.body).hexdigest()
            answer = Answer(body["job_id"], body["status"], code, time.monotonic(), digest)
            self.by_job.setdefault(answer.job_id, []).append(answer)
        except (ValueError, KeyError, TypeError, AttributeError):
            self.undecodable += 1
        with contextlib.suppress(*BROKER_FAILURES):
            await message.ack()

    def times(self) -> list[float]:
        return sorted(a.at for answers in self.by_job.values() for a in answers)

    def duplicates(self) -> list[float]:
        """For each job answered by two different results (a second publish, not a
        redelivery), the seconds between them."""
        gaps = []
        for got in self.by_job.values():
            firsts = {a.digest: a.at for a in reversed(got)}
            if len(firsts) > 1:
                gaps.append(round(sorted(firsts.values())[1] - got[0].at, 2))
        return gaps

    def redelivered(self) -> int:
        """Messages the broker delivered again byte for byte (the reader's ack was lost)."""
        return sum(len(got) - len({a.digest for a in got}) for got in self.by_job.values())

    async def wait(self, job_ids: list[str], timeout_s: float) -> bool:
        """Until every job id has a result, at most ``timeout_s``; whether all came."""
        deadline = time.monotonic() + timeout_s
        while any(j not in self.by_job for j in job_ids):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


@dataclass
class Books:
    """The ledger, the mock's own count and the key's Redis counter, read at one moment."""

    usage_rows: int = 0
    swept_rows: int = 0
    unsettled_calls: int = 0
    ledger_tokens: int = 0  # sum(total_tokens) of the key's usage rows
    counter: int | None = None  # the key's tokens_day counter in Redis
    epoch: bool = False  # Redis holds its quota epoch (the counters are whole)
    holds: int = 0  # reservations still held
    held_tokens: int = 0  # what they hold of the key's counter
    held_jobs: list[str] = field(default_factory=list)  # the first few jobs holding them
    pending_claims: int = 0  # results claimed, not yet marked sent (broker/state/answers.py)
    mock_calls: int = 0
    mock_served: int = 0  # calls the mock did not answer with an error status
    by_status: dict[str, int] = field(default_factory=dict)

    def balanced(self) -> bool:
        return self.accounted() and self.counter == self.ledger_tokens and self.holds == 0

    def accounted(self) -> bool:
        """Every call and result settled, every call the mock served one row of ``usage``, and
        any row more a swept call (recorded as started, its request may never have left)."""
        rows, served = self.usage_rows, self.mock_served
        settled = self.unsettled_calls == 0 and self.pending_claims == 0
        return settled and served <= rows <= served + self.swept_rows


class Stage:
    """One fault run's namespace, database, mock provider, processes, producer and reader."""

    def __init__(self, name: str, sizes: Sizes, out: Path) -> None:
        settings, token = Settings(), secrets.token_hex(3)
        self.name, self.sizes = name, sizes
        self.names = Names(f"faults-{token}")
        self.db_name = f"switchyard_faults_{token}"
        self.admin_dsn = settings.database_url.replace("+asyncpg", "")
        self.database_url = settings.database_url.rsplit("/", 1)[0] + f"/{self.db_name}"
        self.amqp_url, self.redis_url = settings.amqp_url, settings.redis_url
        self.key_id, self.secret = f"faults-{token}", f"sk-faults-{token}"
        self.mock_url = f"http://127.0.0.1:{free_port()}"
        self.config_path = out / f"{name}-config.yaml"
        env = {
            **os.environ,
            "SWITCHYARD_AMQP_URL": self.amqp_url,
            "SWITCHYARD_DATABASE_URL": self.database_url,
            "SWITCHYARD_REDIS_URL": self.redis_url,
            "SWITCHYARD_CONFIG": str(self.config_path),
            "SWITCHYARD_NAMESPACE": self.names.namespace,
            "SWITCHYARD_LOG_LEVEL": "WARNING",
            "SWITCHYARD_CALL_SETTLE_MARGIN_S": str(sizes.settle_margin_s),
        }
        self.procs = Procs(env, out / "logs" / name)
        self.running: dict[str, Proc] = {}
        self.accepting = asyncio.Event()  # cleared while the producer must not publish
        self.accepting.set()
        self.resubmitted = 0  # publishes made again after the broker refused them
        self.counter_key = ""
        self.client: SwitchyardClient | None = None
        self.answers = Answers(self.amqp_url, "faults")
        self.fault: asyncio.Task[Any] | None = None  # the fault, once it has started
        self._admin: AbstractRobustConnection | None = None
        self._started = 0

    async def setup(self) -> None:
        await _admin_sql(self.admin_dsn, f'CREATE DATABASE "{self.db_name}"')
        await asyncio.to_thread(upgrade, self.database_url)
        port = self.mock_url.rsplit(":", 1)[1]
        self.procs.start("mock-provider", *cli("mock-provider", "--port", port))
        await asyncio.to_thread(wait_http, f"{self.mock_url}/healthz")
        await self.mock(latency_ms=self.sizes.latency_ms, jitter_ms=self.sizes.jitter_ms)
        self._write_config()
        self._admin = await aio_pika.connect_robust(_reconnecting(self.amqp_url))
        for kind in KINDS:
            self.start(kind)
        for kind in KINDS:
            await self.consuming(kind, 60)
        url = _reconnecting(self.amqp_url)
        self.client = await SwitchyardClient.connect(url, namespace=self.names.namespace)
        await self.answers.start(self.names)

    def _write_config(self) -> None:
        key = {
            "id": self.key_id,
            "key_sha256": hashlib.sha256(self.secret.encode()).hexdigest(),
            "budgets": {"tokens_per_day": 10**12},  # never refuses: it is there to be counted
        }
        provider = {
            "id": "mock",
            "type": "openai",
            "base_url": f"{self.mock_url}/v1",
            "concurrency": self.sizes.concurrency,
            "timeout_s": self.sizes.timeout_s,
            "models": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}},
        }
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump({"providers": [provider], "keys": [key]}))
        day = window(Period.DAY, utcnow(), load_config(self.config_path).zone).id
        self.counter_key = self.names.quota_bucket("key", self.key_id, "tokens_day", day)

    async def teardown(self) -> None:
        self.procs.stop_all()
        await self.answers.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self._admin is not None:
            n, channel = self.names, await self._admin.channel()
            queues = [n.jobs, n.reroute, n.usage, n.dead, n.alerts, n.results("faults")]
            queues += [n.park(d) for d in PARK_DELAYS_S]
            for queue in queues + [n.provider("mock", lane) for lane in range(8)]:
                await channel.queue_delete(queue)
            await channel.exchange_delete(n.config)
            await self._admin.close()
        redis = Redis.from_url(self.redis_url)
        try:
            async for key in redis.scan_iter(match=f"{self.names.namespace}:*", count=500):
                await redis.delete(key)
        finally:
            await redis.aclose()
        await _admin_sql(self.admin_dsn, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # -- processes ------------------------------------------------------------------------------

    def start(self, kind: str) -> None:
        self._started += 1
        self.running[kind] = self.procs.start(f"{kind}-{self._started}", *cli(*KINDS[kind]))

    def kill(self, kind: str) -> None:
        """SIGKILL the running process of ``kind`` and wait for it to be gone."""
        proc = self.running.pop(kind)
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        self.procs.running.remove(proc)

    async def consuming(self, kind: str, timeout_s: float) -> None:
        """Wait until the process of ``kind`` consumes its queue (again)."""
        n = self.names
        queue = {"scheduler": n.jobs, "worker": n.provider("mock"), "accountant": n.usage}[kind]
        deadline = time.monotonic() + timeout_s
        while await self._consumers(queue) < 1:
            if self.running[kind].popen.poll() is not None:
                raise RuntimeError(f"{kind} exited: see {self.procs.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} did not consume within {timeout_s:g} s")
            await asyncio.sleep(0.1)

    async def _consumers(self, queue: str) -> int:
        """0 too while the broker, or the connection to it, is not back."""
        assert self._admin is not None
        try:
            async with self._admin.channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                return int(declared.declaration_result.consumer_count or 0)
        except Exception:
            return 0

    # -- the mock, the producer -----------------------------------------------------------------

    async def mock(self, **settings: Any) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            (await http.put(f"{self.mock_url}/_mock/config", json=settings)).raise_for_status()

    async def mock_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            stats: dict[str, Any] = (await http.get(f"{self.mock_url}/_mock/stats")).json()
            return stats

    async def busy(self, timeout_s: float = 5.0) -> int:
        """Wait until the mock has calls in flight (jobs are in every process); how many."""
        deadline = time.monotonic() + timeout_s
        while not (in_flight := int((await self.mock_stats())["in_flight"])):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        return in_flight

    async def answering(self, timeout_s: float = 5.0) -> None:
        """Wait for the next result to come in (the worker is publishing results)."""
        self.answers.arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.answers.arrived.wait(), timeout_s)

    def job(self, label: str) -> CompletionJob:
        return make_job(
            [{"role": "user", "content": f"fault {self.name} job {label}"}],
            model="gpt-4o-mini",
            params={"max_tokens": self.sizes.max_tokens},
            job_id=f"{self.names.namespace}-{label}",
        )

    async def submit(self, job: CompletionJob, timeout_s: float = 120) -> None:
        """Publish ``job`` to its results queue; a publish the broker did not take (it is
        coming back) is made again, and counted."""
        assert self.client is not None
        deadline, queue = time.monotonic() + timeout_s, self.names.results("faults")
        while True:
            try:
                await self.client.submit(job, results_queue=queue, api_key=self.secret)
                return
            except BROKER_FAILURES:
                if time.monotonic() > deadline:
                    raise
                self.resubmitted += 1
                await asyncio.sleep(0.5)

    # -- the books --------------------------------------------------------------------------------

    async def books(self) -> Books:
        books = Books()
        stats = await self.mock_stats()
        books.mock_calls = int(stats["calls"])
        books.by_status = {str(k): int(v) for k, v in stats["by_status"].items()}
        errors = sum(n for status, n in books.by_status.items() if int(status) >= 400)
        books.mock_served = books.mock_calls - errors
        pg = await asyncpg.connect(self.database_url.replace("+asyncpg", ""))
        try:
            row = await pg.fetchrow(
                "SELECT count(*) AS n, count(*) FILTER (WHERE swept) AS swept,"
                " coalesce(sum(total_tokens) FILTER (WHERE key_id = $1), 0) AS tokens FROM usage",
                self.key_id,
            )
            books.usage_rows, books.swept_rows = int(row["n"]), int(row["swept"])
            books.ledger_tokens = int(row["tokens"])
            sql = "SELECT count(*) FROM calls WHERE settled_at IS NULL"
            books.unsettled_calls = int(await pg.fetchval(sql))
        finally:
            await pg.close()
        await self._redis_books(books)
        return books

    async def _redis_books(self, books: Books) -> None:
        redis = Redis.from_url(self.redis_url, decode_responses=True)
        try:
            value = await redis.get(self.counter_key)
            books.counter = None if value is None else int(value)
            books.epoch = await redis.exists(self.names.quota_epoch) == 1
            held = await redis.zrange(self.names.quota_holds, 0, -1)
            books.holds = len(held)
            books.held_jobs = sorted({str(r).rsplit(":", 2)[0] for r in held})[:5]
            claims = [k async for k in redis.scan_iter(self.names.answered("*"), count=1000)]
            states = await redis.mget(claims) if claims else []
            books.pending_claims = sum(state == "pending" for state in states)
            for reservation in held:
                raw = await redis.hget(self.names.reservation(str(reservation)), "buckets")
                for bucket in json.loads(raw or "[]"):
                    if bucket["key"] == self.counter_key:
                        books.held_tokens += int(bucket["amount"])
        finally:
            await redis.aclose()

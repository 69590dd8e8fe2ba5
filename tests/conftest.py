"""Fixtures against the real RabbitMQ, Postgres and Redis of this machine.

Isolation: each test session gets a namespace (queue prefix) and a fresh Postgres database; each
test gets its own sub-namespace, whose queues are deleted when it ends. A service that does not
answer skips the tests that need it locally and fails them in CI (``CI`` set).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from broker.core.config import Config, load_config
from broker.core.names import Names
from broker.core.settings import Settings, get_settings
from broker.transport import fastpath
from broker.transport.amqp import PARK_DELAYS_S
from broker.transport.fastpath.connection import CoalescingWriter
from broker.transport.runtime import Service

AMQP_URL = os.environ.get("SWITCHYARD_AMQP_URL", Settings().amqp_url)
REDIS_URL = os.environ.get("SWITCHYARD_REDIS_URL", Settings().redis_url)
ADMIN_DSN = os.environ.get(
    "SWITCHYARD_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SESSION_NS = f"sytest-{secrets.token_hex(3)}"
REPO = Path(__file__).resolve().parent.parent


def _need(service: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        message = f"{service} is not reachable at {host}:{port}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def eventually(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Await an async predicate until it holds; every wait in the tests is bounded."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


TEST_TIMEOUT_S = float(os.environ.get("SWITCHYARD_TEST_TIMEOUT_S", "120"))


@pytest.fixture(autouse=True)
async def _watchdog(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Bound every async test: past ``TEST_TIMEOUT_S`` print every task's stack (where it is
    stuck) and cancel the test, whose own cleanup then runs. pytest-timeout's thread dump shows
    only the event loop waiting in ``select``."""
    loop = asyncio.get_running_loop()
    test_name = getattr(request.node, "originalname", request.node.name)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        print(f"\n{test_name} ran past {TEST_TIMEOUT_S:.0f}s; its tasks:", file=sys.stderr)
        for task in asyncio.all_tasks(loop):
            task.print_stack(limit=12, file=sys.stderr)
            if task.get_coro().__name__ == test_name:  # type: ignore[union-attr]
                task.cancel(f"ran past {TEST_TIMEOUT_S:.0f}s")

    timer = loop.call_later(TEST_TIMEOUT_S, expire)
    try:
        yield
    finally:
        timer.cancel()
    if expired:  # the cancel may have been swallowed on its way out: the test still fails
        pytest.fail(f"{test_name} ran past {TEST_TIMEOUT_S:.0f}s (its tasks' stacks above)")


# ---------------------------------------------------------------------------------------------
# Postgres: one fresh database per session, migrated with the project's own migrations.


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    async with fresh_database(SESSION_NS.replace("-", "_")) as url:
        yield url


@asynccontextmanager
async def fresh_database(name: str) -> AsyncIterator[str]:
    """A new database ``name``, migrated, dropped on exit: a test whose figures must be the
    whole ledger's uses one of its own."""
    _need("PostgreSQL", "127.0.0.1", 5432)
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    try:
        from broker.core.migrate import upgrade

        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        # A connection of its own: the chaos tests restart Postgres during the session.
        admin = await asyncpg.connect(ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        yield conn
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# Redis


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def fresh_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every in-process service reads the circuits on each use, so a test need not wait out a
    view (``broker.state.circuits.REFRESH_S``)."""
    from broker.state import circuits

    monkeypatch.setattr(circuits, "REFRESH_S", 0.0)


# ---------------------------------------------------------------------------------------------
# RabbitMQ: a connection, and a namespace per test whose queues are deleted afterwards.


@pytest.fixture(scope="session")
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    _need("RabbitMQ", "127.0.0.1", 5672)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


_test_counter = iter(range(1, 1_000_000))
_provider_ids: set[str] = set()  # every provider id a test config named, for queue cleanup


@pytest.fixture
async def names(amqp: AbstractRobustConnection) -> AsyncIterator[Names]:
    """A namespace of the test's own. Its quota counters start whole (an epoch is set): the
    session's ledger holds every test's calls, so a rebuild from it would count other tests'
    spend; the rebuild tests delete the epoch and use ids of their own."""
    ns = Names(f"{SESSION_NS}.t{next(_test_counter)}")
    redis = Redis.from_url(REDIS_URL)
    try:
        await redis.set(ns.quota_epoch, b"test")
    finally:
        await redis.aclose()
    yield ns
    channel = await amqp.channel()
    queues = [
        ns.jobs,
        ns.reroute,
        ns.usage,
        ns.dead,
        ns.alerts,
        ns.control,
        ns.webhooks,
        ns.results("batches"),
        ns.results("gateway"),
        *(ns.park(d) for d in PARK_DELAYS_S),
    ]
    lanes = [ns.provider(p, lane) for p in _provider_ids for lane in range(8)]  # default lanes
    for queue in [*queues, *lanes]:
        await channel.queue_delete(queue)
    await channel.exchange_delete(ns.config)
    await channel.close()
    redis = Redis.from_url(REDIS_URL)
    try:
        async for key in redis.scan_iter(match=f"{ns.namespace}:*", count=500):
            await redis.delete(key)
    finally:
        await redis.aclose()


async def queue_depth(amqp: AbstractRobustConnection, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def delete_queues(amqp: AbstractRobustConnection, *queues: str) -> None:
    """Delete queues a test made outside its namespace's fixed set (``names.results(...)``)."""
    channel = await amqp.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    await channel.close()


@pytest.fixture(scope="session", autouse=True)
def fast_path_as_set() -> Iterator[None]:
    """A run with ``SWITCHYARD_AMQP_FAST_PATH`` off (CI runs the AMQP and pipeline tests so)
    must end with the fast path never installed, or it tested nothing of the plain path."""
    yield
    if not get_settings().amqp_fast_path:
        assert not fastpath.installed(), "the fast path was installed in a run with it off"


@pytest.fixture
def fast_path() -> None:
    """The AMQP fast path in place. Skipped in a run with ``SWITCHYARD_AMQP_FAST_PATH`` off:
    installing it would turn it on for the rest of that run (it is process-wide)."""
    if not get_settings().amqp_fast_path:
        pytest.skip("SWITCHYARD_AMQP_FAST_PATH is off in this run")
    fastpath.install()


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch, fast_path: None) -> list[int]:
    """How many frames each socket send of a Switchyard connection carried."""
    counted: list[int] = []
    flush = CoalescingWriter._flush

    def counting(self: CoalescingWriter) -> None:
        if self._pending:
            counted.append(len(self._pending))
        flush(self)

    monkeypatch.setattr(CoalescingWriter, "_flush", counting)
    return counted


async def consumer_count(amqp: AbstractRobustConnection, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    except Exception:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


# ---------------------------------------------------------------------------------------------
# The mock provider: one real server process per session, reset before each test.


class MockProvider:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        # No keep-alive: the server closes an idle connection after 5 s, and a request that
        # takes such a connection as it closes fails with "Server disconnected" (seen in a full
        # run, after a test's 2 s calls left the control connection idle).
        self.http = httpx.Client(
            base_url=base_url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)
        )

    def configure(self, **settings: Any) -> None:
        response = self.http.put("/_mock/config", json=settings)
        response.raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/_mock/stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def reset(self) -> None:
        self.http.post("/_mock/reset").raise_for_status()
        self.configure(
            latency_ms=0,
            jitter_ms=0,
            error_rate=0,
            rate_limit_rate=0,
            retry_after_s=1,
            fail_next=None,
            api_key=None,
        )


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockProvider]:
    with run_mock_provider() as mock:
        yield mock


@contextmanager
def run_mock_provider() -> Iterator[MockProvider]:
    """A mock provider process of its own on a free port, stopped by PID on exit."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "mock-provider", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mock = MockProvider(f"http://127.0.0.1:{port}")

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mock provider exited: {process.stderr.read()!r}")  # type: ignore[union-attr]
        try:
            return mock.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 20, "the mock provider to answer")
        yield mock
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def mock(mock_server: MockProvider) -> MockProvider:
    mock_server.reset()
    return mock_server


# ---------------------------------------------------------------------------------------------
# Config files and in-process pipelines.


def write_config(
    path: Path, mock: MockProvider, providers: list[dict[str, Any]], **top: Any
) -> Path:
    """Write a providers file whose providers all point at the mock; returns its path."""
    full = []
    _provider_ids.update(p["id"] for p in providers)
    for p in providers:
        entry = {"type": "openai", "base_url": f"{mock.base_url}/v1", **p}
        entry.setdefault("models", {"gpt-4o-mini": {"input": 0.15, "output": 0.60}})
        full.append(entry)
    path.write_text(yaml.safe_dump({"providers": full, **top}))
    return path


def dead_provider(provider_id: str, **fields: Any) -> dict[str, Any]:
    """A provider nothing listens for: each call fails at once (a refused connection)."""
    return {
        "id": provider_id,
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "models": {"m": {"input": 1, "output": 1}},
        **fields,
    }


def cheap_then_dear(
    tmp_path: Path, mock: MockProvider, cheap: dict[str, Any], dear: str, **top: Any
) -> Config:
    """Two providers of model ``m``: ``cheap`` first under ``cheapest`` (its own fields; price 1
    unless it says), then ``dear`` (price 5) on the mock."""
    providers = [
        {"models": {"m": {"input": 1, "output": 1}}, **cheap},
        {"id": dear, "models": {"m": {"input": 5, "output": 5}}},
    ]
    return load_config(
        write_config(tmp_path / "p.yaml", mock, providers, default_policy="cheapest", **top)
    )


@pytest.fixture
def config_file(tmp_path: Path, mock: MockProvider) -> Path:
    return write_config(tmp_path / "providers.yaml", mock, [{"id": "mock", "concurrency": 4}])


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)


@pytest.fixture
def pipeline(names: Names, database_url: str) -> Any:
    """``async with pipeline(config, scheduler=True, workers=[...], accountant=True)`` runs the
    chosen services in this event loop and stops them on exit."""

    @asynccontextmanager
    async def run(
        config: Config,
        *,
        scheduler: bool = True,
        workers: list[str] | None = None,
        accountant: bool = True,
        hold_margin_s: float = 60.0,
    ) -> AsyncIterator[list[Service]]:
        from broker.accounting.accountant import Accountant
        from broker.scheduler.service import Scheduler
        from workers.pool import WorkerPool

        services: list[Service] = []
        if scheduler:
            services.append(
                Scheduler(
                    AMQP_URL,
                    config,
                    names,
                    redis_url=REDIS_URL,
                    database_url=database_url,
                    hold_margin_s=hold_margin_s,
                )
            )
        if accountant:
            services.append(Accountant(AMQP_URL, database_url, config, names, redis_url=REDIS_URL))
        for provider_id in workers if workers is not None else [p.id for p in config.providers]:
            services.append(WorkerPool(AMQP_URL, config, names, provider_id, redis_url=REDIS_URL))
        started: list[Service] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
            yield services
        finally:
            for service in reversed(started):
                await service.stop(grace_s=5)

    def factory(config: Config, **kwargs: Any) -> AbstractAsyncContextManager[list[Service]]:
        return run(config, **kwargs)

    return factory


@pytest.fixture
def gateway_in_front(names: Names, database_url: str, pipeline: Any) -> Any:
    """``async with gateway_in_front(config) as url``: the pipeline and a gateway in front of
    it, in this event loop; yields the gateway's base URL."""

    @asynccontextmanager
    async def run(config: Config) -> AsyncIterator[str]:
        from broker.gateway.service import Gateway

        port = free_port()
        service = Gateway(
            AMQP_URL, config, names, port=port, redis_url=REDIS_URL, database_url=database_url
        )
        async with pipeline(config):
            await service.start()
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                await service.stop(grace_s=5)

    return run


def process_env(names: Names, database_url: str, config_path: Path) -> dict[str, str]:
    """Environment for a ``switchyard`` subprocess serving this test's namespace."""
    env = dict(os.environ)
    env.update(
        SWITCHYARD_AMQP_URL=AMQP_URL,
        SWITCHYARD_DATABASE_URL=database_url,
        SWITCHYARD_CONFIG=str(config_path),
        SWITCHYARD_NAMESPACE=names.namespace,
        SWITCHYARD_LOG_LEVEL="WARNING",
        # `switchyard up` serves the gateway too: a port of its own, not another test's.
        SWITCHYARD_GATEWAY_PORT=str(free_port()),
    )
    return env

"""The gateway process: uvicorn serving ``make_app`` in the process's own event loop, one AMQP
connection for every request's job and replies (and the async jobs' results queue), Redis for
where jobs stand, Postgres for the async jobs and the stored batches (whose runner it also runs),
and the config (reloaded like every process's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import uvicorn
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from fastapi import Request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.auth import authenticate
from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.db import make_engine
from broker.core.limits import KeyConfig
from broker.core.names import HEADER_KEY, Names
from broker.gateway.app import make_app
from broker.gateway.batches.api import batch_object
from broker.gateway.batches.files import FilesStore
from broker.gateway.batches.runner import IN_FLIGHT, LEASE, BatchRunner
from broker.gateway.batches.store import BatchStore
from broker.gateway.context import bearer
from broker.gateway.jobs import JobsStore
from broker.state.circuits import Circuits
from broker.state.client import connect_redis
from broker.state.job_states import JobStates
from broker.transport.amqp import Publisher, declare_results_queue, declare_topology
from broker.transport.cancels import declare_cancels, publish_cancel
from broker.transport.rpc import DirectReplies
from broker.transport.runtime import ConsumerSet, Service, Unsettled, connect_server
from broker.transport.webhooks import batch_webhook_id, publish_webhook
from schemas import CompletionJob, JobResult, WebhookRequest

__all__ = ["DEFAULT_PORT", "REQUEST_WAIT_S", "Gateway"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
REQUEST_WAIT_S = 600.0
"""How long a request without a deadline waits for its answer."""
DEADLINE_GRACE_S = 5.0
"""A request with a deadline waits that long past it: the expired result says why."""
READY_CHECK_S = 2.0
RESULTS_PREFETCH = 32
STORE_RETRY_S = 1.0
"""The pause before a result Postgres could not take (it is away) goes back to the queue."""
PURGE_EVERY_S = 3600.0
"""How often expired async jobs are dropped from Postgres."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's ``run_services`` stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway(Service):
    name = "gateway"

    def __init__(
        self,
        amqp_url: str,
        config: Config,
        names: Names,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        redis_url: str,
        database_url: str,
        retention: timedelta = timedelta(days=7),
        file_retention: timedelta = timedelta(days=30),
        batch_in_flight: int = IN_FLIGHT,
        batch_lease: timedelta = LEASE,
    ) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self.host = host
        self.port = port
        self.apply_config(config)
        self._redis = connect_redis(redis_url)
        self.circuits = Circuits(self._redis, names)
        self.job_states = JobStates(self._redis, names)
        self._engine: AsyncEngine = make_engine(database_url)
        self.jobs_store = JobsStore(self._engine, retention)
        self.files = FilesStore(self._engine, file_retention)
        self.batches = BatchStore(self._engine)
        self.batch_runner = BatchRunner(
            lambda: self._require_connection(),
            config,
            names,
            engine=self._engine,
            redis=self._redis,
            retention=file_retention,
            on_end=self._batch_ended,
            in_flight=batch_in_flight,
            lease=batch_lease,
        )
        self.results_queue = names.results("gateway")
        self.consumers = ConsumerSet()
        self.ended: dict[str, asyncio.Event] = {}
        """Async jobs a request waits on, set when their result is stored here."""
        self._connection: AbstractRobustConnection | None = None
        self._rpc: DirectReplies | None = None
        self._publisher: Publisher | None = None
        self._cancels: Publisher | None = None
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._purging: asyncio.Task[None] | None = None

    def apply_config(self, config: Config) -> None:
        self.config = config
        self.public_models = set(config.public_models())

    async def apply(self, config: Config) -> None:
        self.apply_config(config)
        await self.batch_runner.apply(config)

    def _require_connection(self) -> AbstractRobustConnection:
        assert self._connection is not None, "the gateway is not started"
        return self._connection

    async def _batch_ended(self, row: dict[str, Any]) -> None:
        """A stored batch ends (its runner says so, just before recording it): its webhook, if
        it names one, is told."""
        if row["webhook"] is None:
            return
        status = row["status"]
        request = WebhookRequest(
            webhook_id=batch_webhook_id(row["batch_id"], status),
            url=row["webhook"],
            type=f"batch.{status}",
            data=batch_object(row),
            owner=row["owner"],
            occurred_at=utcnow(),
        )
        await publish_webhook(self.publisher, self.names, request)

    @property
    def engine(self) -> AsyncEngine:
        """Postgres (the async jobs, the batches, the webhook deliveries)."""
        return self._engine

    @property
    def rpc(self) -> DirectReplies:
        assert self._rpc is not None, "the gateway is not started"
        return self._rpc

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "the gateway is not started"
        return self._publisher

    async def cancel_untracked(self, job_id: str) -> None:
        """Broadcast that a sync request's job is not wanted (its client went away)."""
        assert self._cancels is not None
        try:
            await publish_cancel(self._cancels, job_id)
        except Exception:  # best effort: the job may run; the caller is gone either way
            log.warning("could not broadcast job %s's cancel", job_id, exc_info=True)

    def caller(self, request: Request) -> tuple[str | None, str | None]:
        """The request's virtual key and its id (None without keys configured); refuses an
        unknown one (401) exactly as the scheduler would."""
        secret = bearer(request)
        key = authenticate({HEADER_KEY: secret} if secret else None, self.config)
        return secret, key.id if key is not None else None

    def key_of(self, request: Request) -> KeyConfig | None:
        """The request's key (None without keys configured); 401 for an unknown one."""
        secret = bearer(request)
        return authenticate({HEADER_KEY: secret} if secret else None, self.config)

    def wait_s(self, job: CompletionJob) -> float:
        """How long a request waits for its job's answer."""
        if job.deadline is None:
            return REQUEST_WAIT_S
        return max((job.deadline - utcnow()).total_seconds(), 0.0) + DEADLINE_GRACE_S

    async def start(self) -> None:
        self._connection = await connect_server(self.amqp_url, name="switchyard-gateway")
        self._rpc = DirectReplies(self._connection, self.names)
        channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(channel, self.names, [])
        self._publisher = Publisher(channel)
        # Results on a channel of their own, a few at a time: a backlog is not taken into
        # memory at once, and with Postgres away each waits before it goes back.
        results_channel = await self._connection.channel()
        await results_channel.set_qos(prefetch_count=RESULTS_PREFETCH)
        results = await declare_results_queue(results_channel, self.names, "gateway")
        self._cancels = Publisher(channel, await declare_cancels(channel, self.names))
        await self.consumers.consume(results, self._store_result, ack=True)
        await self.batch_runner.start()
        self._purging = asyncio.create_task(self._purge())
        server_config = uvicorn.Config(
            make_app(self),
            host=self.host,
            port=self.port,
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,  # its lines go through the process's handler: JSON, trace ids
            loop="none",
            http="httptools",
            proxy_headers=False,  # nothing here reads the client address
        )
        self._server = _Server(server_config)
        self._serving = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._serving.done():  # it could not bind, say: its error is the start's
                await self._serving
                raise RuntimeError("the gateway's HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("gateway listening on http://%s:%d", self.host, self.port)

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._purging is not None:
            self._purging.cancel()
        await self.consumers.stop(grace_s)
        await self.batch_runner.stop(grace_s)
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._serving), grace_s)
            except TimeoutError:
                self._server.force_exit = True
                await self._serving
        if self._rpc is not None:
            self._rpc.close("the gateway is stopping")
        if self._connection is not None:
            await self._connection.close()
        await self._redis.aclose()
        await self._engine.dispose()

    async def _store_result(self, message: AbstractIncomingMessage) -> None:
        """An async job's result, into Postgres; acked once stored. One that is not a result,
        or that Postgres refuses, is dead-lettered (with why); Postgres away returns it, after
        a pause, so the queue is not spun through."""
        try:
            result = JobResult.model_validate_json(message.body)
        except ValueError as exc:
            raise Unsettled("not a JobResult on the gateway's results queue") from exc
        try:
            stored = await self.jobs_store.finish(result)
        except DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc.orig, OSError):
                await asyncio.sleep(STORE_RETRY_S)
                raise
            raise Unsettled(f"Postgres refused job {result.job_id}'s result") from exc
        except OSError:
            await asyncio.sleep(STORE_RETRY_S)
            raise
        if not stored:
            log.info("result of job %s: not an async job of ours (expired?)", result.job_id)
        event = self.ended.get(result.job_id)
        if event is not None:
            event.set()

    async def _purge(self) -> None:
        while True:
            try:
                gone = await self.jobs_store.purge()
                files = await self.files.purge()
                if gone or files:
                    log.info("dropped %d async jobs and %d files past their retention", gone, files)
            except Exception:
                log.warning("could not drop expired async jobs; trying again", exc_info=True)
            await asyncio.sleep(PURGE_EVERY_S)

    async def readiness(self) -> dict[str, bool]:
        """Whether each service the pipeline needs answers now."""
        rabbitmq = self._connection is not None and self._connection.connected.is_set()

        async def redis() -> bool:
            return bool(await self._redis.ping())

        async def postgres() -> bool:
            async with self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True

        checks = {"rabbitmq": rabbitmq}
        for name, check in (("redis", redis), ("postgres", postgres)):
            try:
                async with asyncio.timeout(READY_CHECK_S):
                    checks[name] = await check()
            except Exception:
                checks[name] = False
        return checks

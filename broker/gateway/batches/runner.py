"""The batch runner, in every gateway process: takes the stored batches that need work (each
held under a lease in Postgres, so any number of gateways share them and one that dies hands its
batches on after the lease), drives each (``BatchWork``), and records the answers that come back
on ``<ns>.results.batches`` (whichever gateway takes them), many per transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from redis.asyncio import Redis
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.config import Config
from broker.core.names import Names
from broker.gateway.batches.files import FilesStore
from broker.gateway.batches.lifecycle import BatchWork
from broker.gateway.batches.lines import Answer, answered_line
from broker.gateway.batches.store import BatchStore
from broker.state.job_states import JobStates
from broker.transport.amqp import Publisher, declare_results_queue
from broker.transport.runtime import ConsumerSet, Unsettled
from schemas import JobResult

__all__ = ["BatchRunner", "line_of"]

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=30)
"""How long a batch stays with a runner that stopped renewing it (it died)."""
CLAIM_EVERY_S = 1.0
MAX_HELD = 32
"""Batches one runner drives at once (most of the time each only waits for answers); more wait
for it or another runner."""
IN_FLIGHT = 2_000
"""Lines of one batch sent and not yet answered, at most."""
RESULTS_PREFETCH = 512
WRITE_GROUP = 500
STORE_RETRY_S = 1.0


def line_of(job_id: str) -> tuple[str, int] | None:
    """The (batch, line) a batch line's job id ``<batch>-<line>-<round>`` names."""
    parts = job_id.split("-")
    if len(parts) != 3 or not parts[0].startswith("batch_") or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


class _AnswerWriter:
    """Answers recorded many per transaction: each caller waits for its own commit."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self._waiting: asyncio.Queue[tuple[str, int, JobResult, asyncio.Future[None]]]
        self._waiting = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._write())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its end; the caller's own cancel still raises

    async def add(self, batch_id: str, line: int, result: JobResult) -> None:
        done = asyncio.get_running_loop().create_future()
        await self._waiting.put((batch_id, line, result, done))
        await done

    async def _write(self) -> None:
        while True:
            group = [await self._waiting.get()]
            while len(group) < WRITE_GROUP and not self._waiting.empty():
                group.append(self._waiting.get_nowait())
            try:
                ids = await self.store.custom_ids([(b, n) for b, n, _, _ in group])
                answers: list[tuple[str, Answer]] = [
                    (b, answered_line(b, n, ids[(b, n)], r))
                    for b, n, r, _ in group
                    if (b, n) in ids
                ]
                await self.store.answer(answers)
            except Exception as exc:
                for *_, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for *_, done in group:
                if not done.done():
                    done.set_result(None)


class BatchRunner:
    """A ``Service`` (start, stop, apply) run beside the gateway."""

    name = "batch-runner"

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        config: Config,
        names: Names,
        *,
        engine: AsyncEngine,
        redis: Redis,
        retention: timedelta,
        on_end: Callable[[dict[str, Any]], Awaitable[None]],
        in_flight: int = IN_FLIGHT,
        lease: timedelta = LEASE,
    ) -> None:
        self._connection = connection
        self.config = config
        self.names = names
        self.runner_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.store = BatchStore(engine)
        self.files = FilesStore(engine, retention)
        self.job_states = JobStates(redis, names)
        self.results_queue = names.results("batches")
        self.consumers = ConsumerSet()
        self._writer = _AnswerWriter(self.store)
        self._on_end = on_end
        self._in_flight = in_flight
        self._lease = lease
        self._held: dict[str, asyncio.Task[None]] = {}
        self._claiming: asyncio.Task[None] | None = None
        self._work: BatchWork | None = None

    async def apply(self, config: Config) -> None:
        self.config = config

    async def start(self) -> None:
        connection = self._connection()
        channel = await connection.channel(publisher_confirms=True)
        results_channel = await connection.channel()
        await results_channel.set_qos(prefetch_count=RESULTS_PREFETCH)
        results = await declare_results_queue(results_channel, self.names, "batches")
        self._work = BatchWork(
            self.store,
            self.files,
            Publisher(channel),
            self.names,
            lambda: self.config,
            self.job_states,
            results_queue=self.results_queue,
            in_flight=self._in_flight,
            on_end=self._on_end,
        )
        self._writer.start()
        await self.consumers.consume(results, self._collect, ack=True)
        self._claiming = asyncio.create_task(self._claim())

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._claiming is not None:
            self._claiming.cancel()
        held = dict(self._held)  # each task leaves _held as it ends
        for task in held.values():
            task.cancel()
        await asyncio.gather(*held.values(), return_exceptions=True)
        await self.consumers.stop(grace_s)
        await self._writer.stop()
        for batch_id in held:  # another runner takes them at once, not after the lease
            with contextlib.suppress(Exception):
                await self.store.release(self.runner_id, batch_id)

    async def _claim(self) -> None:
        """Take batches that need a runner, renew the leases of those held; for ever. Leases not
        renewed for half their time are let go: another runner may take the batches by then,
        and two would drive one batch."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            if loop.time() - renewed > self._lease.total_seconds() / 2:
                for batch_id in list(self._held):
                    self._held.pop(batch_id).cancel()
            try:
                held = await self.store.renew(self.runner_id, list(self._held), self._lease)
                renewed = loop.time()
                for batch_id in set(self._held) - held:  # lost (this runner stalled): stop
                    self._held.pop(batch_id).cancel()
                room = MAX_HELD - len(self._held)
                if room > 0:
                    for batch_id in await self.store.claim(self.runner_id, self._lease, room):
                        self._held[batch_id] = asyncio.create_task(self._drive(batch_id))
            except Exception:
                log.warning("could not claim or renew batches; trying again", exc_info=True)
            await asyncio.sleep(CLAIM_EVERY_S)

    async def _drive(self, batch_id: str) -> None:
        assert self._work is not None
        try:
            await self._work.run(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: its run failed; it will be taken up again", batch_id)
            await asyncio.sleep(self._lease.total_seconds())  # keep the lease: not spun
        finally:
            self._held.pop(batch_id, None)
        with contextlib.suppress(Exception):
            await self.store.release(self.runner_id, batch_id)

    async def _collect(self, message: AbstractIncomingMessage) -> None:
        """A line's answer, recorded once; Postgres away returns it after a pause."""
        try:
            result = JobResult.model_validate_json(message.body)
        except ValueError as exc:
            raise Unsettled("not a JobResult on the batches' results queue") from exc
        where = line_of(result.job_id)
        if where is None:
            raise Unsettled(f"job {result.job_id[:128]!r} is not a batch line")
        try:
            await self._writer.add(*where, result)
        except (IntegrityError, DataError) as exc:  # the answer itself: it can never be stored
            raise Unsettled(f"Postgres refused batch line {result.job_id}'s answer") from exc
        except (DBAPIError, OSError):
            # Away, restarting, a deadlock or a timeout: the group's answers all come again.
            await asyncio.sleep(STORE_RETRY_S)
            raise

"""Stored batches under faults and at size (issue #17), with real processes: a gateway (its batch
runner), a scheduler, a worker and an accountant, each its own ``switchyard`` process, in a world
of their own (``chaos.Stage``: namespace, database, mock provider).

    python ops/bench/batches.py [--lines N] [--faults scheduler,worker,accountant,gateway,rabbitmq]
    python ops/bench/batches.py --throughput [--lines 20000] [--rounds 2] [--in-flight 2000]

**Faults**: a file of N lines goes in through OpenAI's Files and Batch APIs (the ``openai`` SDK);
each fault lands in turn while lines are in flight (SIGKILL and a new process; RabbitMQ stopped
and started); the batch must end ``completed`` with every custom_id once across its output and
error files, and ``usage`` holding one row per call the mock served (``chaos.Books``). The test
suite runs it small (``tests/test_batch_faults.py``).

**Throughput** (``run.py --scenarios batches``, or ``--throughput`` here): no faults, the mock at
0 ms, the worker at 200 calls in flight. Rounds alternate the two sides (batch, AMQP, AMQP,
batch, ...) in the one world after a warm-up of each:

- **batch**: a file of N lines uploaded with the SDK, the batch created, timed from the create
  call to the batch's ``completed_at``: lines/s; the RSS of every process sampled each second from
  before the upload to the end (the scheduler's must stay flat while the lines stream in);
- **AMQP**: the same N requests as jobs (same model, messages, ``max_tokens``, the same virtual
  key) published with ``SwitchyardClient.submit`` to a durable results queue read with
  ``SwitchyardClient.results``, at most the batch's window (``SWITCHYARD_BATCH_IN_FLIGHT``)
  unanswered, timed from the first publish to the last result: jobs/s, the baseline.

Each side's CPU per job of every process (gateway, scheduler, worker, accountant, RabbitMQ,
Postgres, this producer) is read after the accountant has drained the usage queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from openai import AsyncOpenAI
from redis.asyncio import Redis
from redis.exceptions import RedisError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import FULL, KINDS, Books, Sizes, Stage
from faults import RABBITMQ, settle, stopped, unavailable
from load import Run
from procs import (
    REPO,
    Proc,
    cli,
    cpu_seconds,
    free_port,
    machine_busy_s,
    memory_kib,
    pids_named,
    wait_http,
)

from broker.client import make_job
from schemas import CompletionJob

if TYPE_CHECKING:
    from run import Bench

FAULTS = ("scheduler", "worker", "accountant", "gateway", "rabbitmq")
AMQP_RESULTS = "speed"
"""The throughput measurement's results queue (``<ns>.results.speed``) for the AMQP side."""


@dataclass
class BatchReport:
    lines: int
    faults: list[str]
    status: str = ""
    answered_once: bool = False
    output_lines: int = 0
    error_lines: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    books: Books = field(default_factory=Books)
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)


class BatchStage(Stage):
    """A fault stage with a gateway process in front: its batch runner sends the lines."""

    def __init__(
        self, sizes: Sizes, out: Path, in_flight: int, profile: frozenset[str] = frozenset()
    ) -> None:
        super().__init__("batch", sizes, out)
        self.out = out
        self.profile = profile  # kinds of process run under ``cpuprofile.py``
        self.port = free_port()
        self.procs.env.update(
            SWITCHYARD_BATCH_IN_FLIGHT=str(in_flight),
            SWITCHYARD_BATCH_LEASE_S="3",
            SWITCHYARD_GATEWAY_PORT=str(self.port),
        )
        self.gateway: Proc | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def setup(self) -> None:
        await super().setup()
        self.start_gateway()
        await asyncio.to_thread(wait_http, f"{self.base_url}/readyz", 60)

    def start_gateway(self) -> None:
        self._started += 1
        name = f"gateway-{self._started}"
        self.gateway = self.procs.start(name, *self._command(name, "gateway"))

    def start(self, kind: str) -> None:
        self._started += 1
        name = f"{kind}-{self._started}"
        self.running[kind] = self.procs.start(name, *self._command(name, *KINDS[kind]))

    def _command(self, name: str, *command: str) -> tuple[str, ...]:
        """``switchyard COMMAND``, under the CPU sampler when ``profile`` names its kind."""
        if command[0] not in self.profile:
            return cli(*command)
        out = self.out / f"profile-batches-{name}.txt"
        return (str(REPO / "ops" / "bench" / "cpuprofile.py"), str(out), *command)

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.popen.send_signal(signal.SIGKILL)
        self.gateway.popen.wait(10)
        self.procs.running.remove(self.gateway)

    async def teardown(self) -> None:
        self.procs.stop_all()
        if self._admin is not None:
            n = self.names
            with contextlib.suppress(Exception):
                channel = await self._admin.channel()
                queues = (n.results("batches"), n.results("gateway"), n.results(AMQP_RESULTS))
                for queue in (*queues, n.control, n.webhooks):
                    await channel.queue_delete(queue)
        await super().teardown()

    async def answered(self) -> int:
        pg = await asyncpg.connect(self.database_url.replace("+asyncpg", ""))
        try:
            return int(
                await pg.fetchval("SELECT count(*) FROM batch_lines WHERE status IS NOT NULL")
            )
        finally:
            await pg.close()


async def fault(stage: BatchStage, name: str) -> None:
    """One fault, back when its process consumes again (or the broker answers)."""
    if name == "gateway":
        stage.kill_gateway()
        stage.start_gateway()
        await asyncio.to_thread(wait_http, f"{stage.base_url}/readyz", 60)
    elif name == "rabbitmq":
        async with stopped(RABBITMQ):
            await asyncio.sleep(stage.sizes.rabbitmq_down_s)
    else:
        stage.kill(name)
        stage.start(name)
        await stage.consuming(name, 60)


def batch_file(path: Path, lines: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(lines)]
    with path.open("wb") as sink:
        for custom_id in ids:
            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"batch line {custom_id}"}],
            }
            entry = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
            sink.write(orjson.dumps({**entry, "body": body}) + b"\n")
    return ids


async def run_batch_faults(
    lines: int, faults: tuple[str, ...], out: Path, sizes: Sizes, in_flight: int = 200
) -> BatchReport:
    """One batch of ``lines`` through every fault in turn; judged."""
    report = BatchReport(lines, list(faults))
    stage = BatchStage(sizes, out, in_flight)
    try:
        await stage.setup()
        sdk = AsyncOpenAI(base_url=f"{stage.base_url}/v1", api_key=stage.secret, max_retries=8)
        ids = batch_file(out / "batch-input.jsonl", lines, stage.names.namespace)
        begin = time.monotonic()
        uploaded = await sdk.files.create(
            file=(out / "batch-input.jsonl").open("rb"), purpose="batch"
        )
        batch = await sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for n, name in enumerate(faults, start=1):
            await _until(lambda: stage.answered(), lines * n // (len(faults) + 1), 300)
            print(f"{time.monotonic() - begin:6.1f} s: {await stage.answered()} answered; {name}")
            await fault(stage, name)
        done = await _ended(sdk, batch.id, sizes.answer_timeout_s + 120)
        report.seconds = round(time.monotonic() - begin, 1)
        report.status = done["status"]
        await _read_files(sdk, done, ids, report)
        report.books, _ = await settle(stage, sizes.settle_timeout_s)
        await sdk.close()
    finally:
        await stage.teardown()
    report.findings = _judge(report)
    return report


async def _until(count: Any, target: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await count() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {target} lines answered within {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def _ended(sdk: AsyncOpenAI, batch_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):  # the gateway may be coming back
            batch = (await sdk.batches.retrieve(batch_id)).model_dump()
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} did not end within {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def _read_files(
    sdk: AsyncOpenAI, done: dict[str, Any], ids: list[str], report: BatchReport
) -> None:
    seen: list[str] = []
    for key in ("output_file_id", "error_file_id"):
        if done[key] is None:
            continue
        rows = [orjson.loads(r) for r in (await sdk.files.content(done[key])).read().splitlines()]
        seen += [r["custom_id"] for r in rows]
        if key == "output_file_id":
            report.output_lines = len(rows)
        else:
            report.error_lines = len(rows)
            for r in rows:
                body = (r.get("response") or {}).get("body") or {}
                code = (body.get("error") or r.get("error") or {}).get("code", "?")
                report.error_codes[code] = report.error_codes.get(code, 0) + 1
    report.answered_once = sorted(seen) == sorted(ids)


def _judge(r: BatchReport) -> list[str]:
    found = []
    if r.status != "completed":
        found.append(f"the batch ended {r.status}")
    if not r.answered_once:
        found.append("the output and error files do not hold every custom_id exactly once")
    if r.error_lines:
        found.append(f"{r.error_lines} lines failed: {r.error_codes}")
    if not r.books.accounted():
        found.append(f"the books do not balance: {asdict(r.books)}")
    return found


# --- throughput (no faults) ---------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """The throughput measurement's sizes; ``run.py`` takes them from its own."""

    lines: int = 20_000  # per batch, and jobs per AMQP run
    rounds: int = 2  # each one batch and one AMQP run; the order flips every round
    window: int = 2_000  # SWITCHYARD_BATCH_IN_FLIGHT; the AMQP side keeps as many unanswered
    concurrency: int = 200  # the worker's calls in flight (run.py's throughput scenario's)
    warmup: int = 300  # lines, and jobs, before the rounds
    publish_in_flight: int = 256  # the AMQP side's publishes awaiting confirms (the runner's group)
    timeout_s: float = 900.0  # per side


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


class Memory:
    """The RSS of named processes, sampled every second (and once more at the end); with
    ``progress``, also how many lines were answered at each sample."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.samples: dict[str, list[int]] = {name: [] for name in procs}
        self.progress: Callable[[], Any] | None = None
        self.timeline: list[tuple[float, int]] = []
        self._began = time.perf_counter()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, dict[str, float]]:
        """The samples' summary in MiB; the sampler ends between samples (not mid-query, so
        the connection ``progress`` uses stays usable)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        self._take()
        return {
            name: {
                "first": _mib(kib[0]),
                # halfway against last tells growth that levels off from growth that goes on
                "half": _mib(kib[len(kib) // 2]),
                "last": _mib(kib[-1]),
                "peak": _mib(max(kib)),
            }
            for name, kib in self.samples.items()
            if kib
        }

    def _take(self) -> None:
        for name, proc in self.procs.items():
            with contextlib.suppress(OSError):
                self.samples[name].append(memory_kib(proc.pid)[0])

    async def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            if self.progress is not None:
                with contextlib.suppress(Exception):
                    answered = await self.progress()
                    self.timeline.append((round(time.perf_counter() - self._began, 1), answered))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)


class _Cpu:
    """CPU seconds of the world's processes and of ``others`` (RabbitMQ, Postgres, this
    producer) from one moment on, and the machine's busy cores: all of them, and those no
    process counted here used (another load on the shared machine)."""

    def __init__(
        self,
        procs: dict[str, Proc],
        mock: Proc | None,
        others: Callable[..., dict[str, float]],
    ) -> None:
        self.procs, self.mock, self.others = procs, mock, others
        self.before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        self.mock_before = cpu_seconds(mock.pid) if mock is not None else 0.0
        self.others_before = others()
        self.busy_before = machine_busy_s()
        self.began = time.perf_counter()

    def read(self) -> tuple[dict[str, float], dict[str, float], float, float]:
        mine = {name: cpu_seconds(p.pid) - self.before[name] for name, p in self.procs.items()}
        others = self.others(since=self.others_before)
        if self.mock is not None:
            others["mock"] = round(cpu_seconds(self.mock.pid) - self.mock_before, 3)
        wall = time.perf_counter() - self.began
        busy = machine_busy_s() - self.busy_before
        counted = sum(mine.values()) + sum(others.values())
        return mine, others, busy / wall, max(0.0, busy - counted) / wall


class Speed:
    """One world's two sides: batches through the gateway, and jobs through ``submit``."""

    def __init__(
        self, stage: BatchStage, t: Throughput, others: Callable[..., dict[str, float]]
    ) -> None:
        self.stage, self.t, self.others = stage, t, others
        self.sdk = AsyncOpenAI(
            base_url=f"{stage.base_url}/v1", api_key=stage.secret, max_retries=2, timeout=600
        )
        self.queue = ""
        self._reader: asyncio.Task[None] | None = None
        self._pg: asyncpg.Connection | None = None
        # The AMQP side's run in progress: job id -> when its publish began.
        self._sent: dict[str, float] = {}
        self._room = asyncio.Semaphore(t.window)
        self._left = 0
        self._all_back = asyncio.Event()
        self._run = Run("")
        self.reconnects = 0  # the bench's broker connection's: another's test restarted it

    def _reconnected(self, *_: Any) -> None:
        self.reconnects += 1

    async def open(self) -> None:
        assert self.stage.client is not None
        self.queue = await self.stage.client.open_results(AMQP_RESULTS)
        self._reader = asyncio.create_task(self._read())
        self._pg = await asyncpg.connect(self.stage.database_url.replace("+asyncpg", ""))
        assert self.stage._admin is not None
        self.stage._admin.reconnect_callbacks.add(self._reconnected)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pg is not None:
            await self._pg.close()
        await self.sdk.close()

    def procs(self) -> dict[str, Proc]:
        assert self.stage.gateway is not None
        return {"gateway": self.stage.gateway, **self.stage.running}

    # -- the AMQP side ------------------------------------------------------------------------

    def _job(self, tag: str, i: int) -> CompletionJob:
        """The request a batch file's line ``i`` makes (``batch_file``), as a job."""
        custom_id = f"{tag}-{i}"
        return make_job(
            [{"role": "user", "content": f"batch line {custom_id}"}],
            model="gpt-4o-mini",
            params={"max_tokens": 16},
            job_id=f"{self.stage.names.namespace}-{custom_id}",
        )

    async def _read(self) -> None:
        assert self.stage.client is not None
        async for result in self.stage.client.results(self.queue, prefetch=500):
            began = self._sent.pop(result.job_id, None)
            if began is None:
                continue  # not this run's (a warm-up's, after its run gave up)
            if result.status.value == "succeeded":
                self._run.jobs += 1
                self._run.latencies_ms.append((time.perf_counter() - began) * 1000)
            else:
                self._run.errors += 1
                code = result.error.code.value if result.error else result.status.value
                codes = self._run.extra.setdefault("error_codes", {})
                codes[code] = codes.get(code, 0) + 1
            self._room.release()
            self._left -= 1
            if self._left == 0:
                self._all_back.set()

    async def amqp(self, name: str, total: int, tag: str) -> Run:
        """``total`` jobs through ``submit``, at most the window unanswered; timed from the first
        publish to the last result."""
        assert self.stage.client is not None
        client, secret = self.stage.client, self.stage.secret
        jobs = iter([self._job(tag, i) for i in range(total)])
        self._run = run = Run(name)
        self._room = asyncio.Semaphore(self.t.window)
        self._left, self._all_back = total, asyncio.Event()
        self._sent.clear()

        async def lane() -> None:
            for job in jobs:
                await self._room.acquire()
                self._sent[job.job_id] = time.perf_counter()
                await client.submit(job, results_queue=self.queue, api_key=secret)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(min(self.t.publish_in_flight, total))))
        try:
            await asyncio.wait_for(self._all_back.wait(), self.t.timeout_s)
        except TimeoutError:
            run.extra["capped"] = True
        run.seconds = time.perf_counter() - started
        run.errors += total - run.jobs - run.errors
        return run

    # -- the batch side -----------------------------------------------------------------------

    async def batch(self, name: str, total: int, tag: str, out: Path) -> Run:
        """A batch of ``total`` lines: uploaded, created, timed from the create call to its
        ``completed_at``; the processes' RSS sampled from before the upload to the end."""
        assert self._pg is not None
        pg = self._pg
        path = out / "batch-speed-input.jsonl"
        ids = batch_file(path, total, tag)
        memory = Memory(self.procs())
        memory.start()
        began = time.perf_counter()
        with path.open("rb") as source:
            uploaded = await self.sdk.files.create(file=source, purpose="batch")
        upload_s = time.perf_counter() - began
        wall = time.time()
        batch = await self.sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        sql = "SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND status IS NOT NULL"
        memory.progress = lambda: pg.fetchval(sql, batch.id)
        done = await _ended(self.sdk, batch.id, self.t.timeout_s)
        seen = time.time()
        rss = await memory.stop()
        row = await pg.fetchrow("SELECT * FROM batches WHERE batch_id = $1", batch.id)
        end = row["completed_at"].timestamp() if row["completed_at"] else seen
        run = Run(name, seconds=end - wall)
        counts = done["request_counts"] or {}
        run.jobs = int(counts.get("completed") or 0)
        run.errors = total - run.jobs
        run.latencies_ms = [run.seconds * 1000]  # the batch's own: create to completed
        moments = {k: row[f"{k}_at"] for k in ("in_progress", "finalizing", "completed")}
        run.extra.update(
            status=done["status"],
            upload_s=round(upload_s, 2),
            input_mib=round(path.stat().st_size / 2**20, 2),
            phases_s={
                # the create call and a runner's claim (every second) and validation
                "validate": _between(wall, moments["in_progress"]),
                # lines sent, called and answered, a window at a time
                "send_and_answer": _between(moments["in_progress"], moments["finalizing"]),
                # the output and error files written
                "finalize": _between(moments["finalizing"], moments["completed"]),
            },
            rss=rss,
            answered_timeline=memory.timeline,
        )
        report = BatchReport(total, [])
        run.extra["_ids"], run.extra["_done"], run.extra["_report"] = ids, done, report
        return run

    async def check_files(self, run: Run) -> None:
        """Every custom_id once across the batch's output and error files (after the timing)."""
        ids, done, report = (run.extra.pop(k) for k in ("_ids", "_done", "_report"))
        await _read_files(self.sdk, done, ids, report)
        if not report.answered_once:
            run.extra["files_wrong"] = True
            run.errors = max(run.errors, 1)
            run.jobs = min(run.jobs, report.output_lines)

    # -- both, in rounds ----------------------------------------------------------------------

    async def drained(self, timeout_s: float = 60.0) -> None:
        """Until the accountant has emptied the usage queue."""
        deadline = time.monotonic() + timeout_s
        # Polling the broker is the only way to see another process's queue drain.
        while await self._depth(self.stage.names.usage) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def _depth(self, queue: str) -> int:
        assert self.stage._admin is not None
        async with self.stage._admin.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    async def _pg_work(self) -> dict[str, int]:
        """The world's database's counters (``pg_stat_database``): what Postgres did for it."""
        assert self._pg is not None
        await self._pg.execute("SELECT pg_stat_clear_snapshot()")
        row = await self._pg.fetchrow(
            "SELECT xact_commit, tup_returned, tup_fetched, tup_inserted, tup_updated,"
            " blks_hit + blks_read AS blocks FROM pg_stat_database WHERE datname = $1",
            self.stage.db_name,
        )
        work = {k: int(v) for k, v in dict(row).items()}
        lines = await self._pg.fetchrow(
            "SELECT seq_scan, seq_tup_read, idx_scan, idx_tup_fetch, autovacuum_count,"
            " autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'batch_lines'"
        )
        work.update({f"batch_lines.{k}": int(v or 0) for k, v in dict(lines or {}).items()})
        return work

    async def _backends_cpu(self) -> dict[int, float]:
        """CPU seconds of this world's Postgres backends (the bench's own connection aside),
        to tell them from the rest of Postgres (autovacuum, checkpointer, other databases)."""
        assert self._pg is not None
        pids = await self._pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.stage.db_name,
        )
        used = {}
        for row in pids:
            with contextlib.suppress(OSError):
                used[int(row["pid"])] = cpu_seconds(int(row["pid"]))
        return used

    async def _servers(self) -> dict[str, str]:
        """When Postgres and Redis last started: a change during a side means something else
        (another session's fault test) restarted them under it."""
        assert self._pg is not None
        query = "SELECT pg_postmaster_start_time()"
        try:
            started = {"postgres": str(await self._pg.fetchval(query))}
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):  # restarted: reconnect
            self._pg = await asyncpg.connect(self.stage.database_url.replace("+asyncpg", ""))
            started = {"postgres": f"{await self._pg.fetchval(query)} (reconnected)"}
        redis = Redis.from_url(self.stage.redis_url)
        try:
            started["redis"] = str((await redis.info("server"))["run_id"])
        except RedisError:
            started["redis"] = "away"
        finally:
            await redis.aclose()
        return started

    async def side(self, side: str, name: str, total: int, tag: str, out: Path) -> Run:
        """One side's run, with every process's CPU read once the usage queue is drained."""
        servers = await self._servers()
        pg_before = await self._pg_work()
        backends_before = await self._backends_cpu()
        mock = next((p for p in self.stage.procs.running if p.name == "mock-provider"), None)
        reading = _Cpu(self.procs(), mock, self.others)
        reconnects = self.reconnects
        if side == "batch":
            run = await self.batch(name, total, tag, out)
        else:
            memory = Memory(self.procs())
            memory.start()
            run = await self.amqp(name, total, tag)
            run.extra["rss"] = await memory.stop()
        await self.drained()
        mine, others, busy, foreign = reading.read()
        servers_after = await self._servers()
        backends = await self._backends_cpu()
        world = sum(used - backends_before.get(pid, 0.0) for pid, used in backends.items())
        listed = list(others.items())
        at = next((i + 1 for i, (k, _) in enumerate(listed) if k == "postgres"), len(listed))
        others = dict([*listed[:at], ("postgres_world", round(world, 3)), *listed[at:]])
        await asyncio.sleep(0.6)  # backends flush their statistics at most every 0.5 s
        pg_after = await self._pg_work()
        run.extra["pg_work"] = {k: pg_after[k] - pg_before[k] for k in pg_after}
        run.extra.update(cpu_s=mine, others_cpu_s=others, busy_cores=busy, foreign_cores=foreign)
        restarted = [k for k, v in servers_after.items() if servers[k] != v]
        if self.reconnects != reconnects:
            restarted.append(f"rabbitmq ({self.reconnects - reconnects} reconnects)")
        if restarted:
            run.extra["restarted"] = restarted
        if side == "batch":
            await self.check_files(run)
        return run

    async def rounds(self, out: Path) -> list[Run]:
        t = self.t
        for side in ("batch", "amqp"):
            await self.side(side, "warm-up", t.warmup, f"warm-{side}", out)
        sides: dict[str, list[Run]] = {"batch": [], "amqp": []}
        for n in range(t.rounds):
            order = ("batch", "amqp") if n % 2 == 0 else ("amqp", "batch")
            for side in order:
                run = await self.side(side, side, t.lines, f"r{n + 1}-{side}", out)
                print(
                    f"   round {n + 1} {side}: {run.per_second:.1f}/s"
                    f" ({run.jobs} ok, {run.errors} not, {run.seconds:.1f} s)",
                    flush=True,
                )
                sides[side].append(run)
        return _merged(t, sides)


def _between(start: Any, end: Any) -> float | None:
    if start is None or end is None:
        return None
    begin = start if isinstance(start, float) else start.timestamp()
    return round(end.timestamp() - begin, 2)


def _merged(t: Throughput, sides: dict[str, list[Run]]) -> list[Run]:
    """The two sides' rounds as the bench's two rows."""
    amqp = Run.merged("batches: AMQP submit (baseline)", sides["amqp"])
    via = Run.merged(f"batches: HTTP files/batches, {t.lines}-line batch", sides["batch"])
    for side, run in (("amqp", amqp), ("batch", via)):
        rounds = sides[side]
        cpu: dict[str, float] = {}
        others: dict[str, float] = {}
        for r in rounds:
            for key, seconds in r.extra["cpu_s"].items():
                cpu[key] = cpu.get(key, 0.0) + seconds
            for key, seconds in r.extra["others_cpu_s"].items():
                others[key] = others.get(key, 0.0) + seconds
        jobs = max(run.jobs, 1)
        run.extra.update(
            side=side,
            window=t.window,
            worker_concurrency=t.concurrency,
            round_per_second=[round(r.per_second, 1) for r in rounds],
            cpu_s_per_job_ms=round(sum(cpu.values()) / jobs * 1000, 3),
            cpu_ms_per_job={k: round(v / jobs * 1000, 3) for k, v in cpu.items()},
            others_cpu_ms_per_job={k: round(v / jobs * 1000, 3) for k, v in others.items()},
            cpu_ms_per_job_rounds=[
                {k: round(v / max(r.jobs, 1) * 1000, 3) for k, v in r.extra["cpu_s"].items()}
                for r in rounds
            ],
            others_cpu_ms_per_job_rounds=[
                {k: round(v / max(r.jobs, 1) * 1000, 3) for k, v in r.extra["others_cpu_s"].items()}
                for r in rounds
            ],
            lines=t.lines,
            machine_busy_cores=[round(r.extra["busy_cores"], 2) for r in rounds],
            foreign_cores=[round(r.extra["foreign_cores"], 2) for r in rounds],
            restarted=[r.extra.get("restarted", []) for r in rounds],
            error_codes=[r.extra.get("error_codes", {}) for r in rounds],
            rss_rounds=[r.extra["rss"] for r in rounds],
            pg_work_per_job={
                k: round(sum(r.extra["pg_work"][k] for r in rounds) / jobs, 2)
                for k in rounds[0].extra["pg_work"]
            }
            if rounds
            else {},
        )
        # bench.md's notes show ``rss_mib``: the scheduler's (and the gateway's) in each round
        shown = ("scheduler", "gateway") if side == "batch" else ("scheduler",)
        run.extra["rss_mib"] = {
            f"{name} r{n}": r.extra["rss"][name]
            for n, r in enumerate(rounds, start=1)
            for name in shown
            if name in r.extra["rss"]
        }
    via.extra["vs_baseline_throughput"] = round(via.per_second / max(amqp.per_second, 1e-9), 3)
    via.extra["round_ratios"] = [
        round(b.per_second / max(a.per_second, 1e-9), 3)
        for a, b in zip(sides["amqp"], sides["batch"], strict=True)
    ]
    via.extra["upload_s"] = [r.extra["upload_s"] for r in sides["batch"]]
    via.extra["phases_s"] = [r.extra["phases_s"] for r in sides["batch"]]
    via.extra["answered_timeline"] = [r.extra["answered_timeline"] for r in sides["batch"]]
    via.extra["input_mib"] = sides["batch"][0].extra["input_mib"] if sides["batch"] else None
    return [amqp, via]


async def throughput(
    t: Throughput,
    out: Path,
    others: Callable[..., dict[str, float]],
    profile: frozenset[str] = frozenset(),
) -> list[Run]:
    """The measurement in a world of its own (``BatchStage``), removed at the end."""
    sizes = replace(FULL, latency_ms=0.0, jitter_ms=0.0, concurrency=t.concurrency, timeout_s=60.0)
    stage = BatchStage(sizes, out, t.window, profile)
    speed: Speed | None = None
    try:
        await stage.setup()
        speed = Speed(stage, t, others)
        await speed.open()
        return await speed.rounds(out)
    finally:
        if speed is not None:
            await speed.close()
        await stage.teardown()


async def scenario(bench: Bench, others_cpu: Callable[..., dict[str, float]]) -> list[Run]:
    """For ``run.py``: its sizes (``batch_*``, the throughput scenario's worker concurrency and
    warm-up) and ``--profile``; a world of its own beside the bench's."""
    s = bench.sizes
    t = Throughput(
        lines=s.batch_lines,
        rounds=s.batch_rounds,
        window=s.batch_window,
        concurrency=s.throughput_in_flight,
        warmup=s.warmup_jobs,
    )
    return await throughput(t, bench.out, others_cpu, bench.profile)


def _work(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k} {n}" for k, n in extra.get("pg_work_per_job", {}).items())


def _rss_cell(rss: dict[str, float] | None) -> str:
    if not rss:
        return "-"
    return f"{rss['first']}→{rss['half']}→{rss['last']} (peak {rss['peak']})"


def markdown(results: dict[str, Any]) -> str:
    """bench.md's section of the batches scenario: both sides' figures side by side."""
    rows = {r["extra"].get("side"): r for r in results["runs"] if r["name"].startswith("batches:")}
    via, amqp = rows.get("batch"), rows.get("amqp")
    if via is None or amqp is None:
        return ""
    v, a = via["extra"], amqp["extra"]

    def cpu(extra: dict[str, Any], key: str) -> str:
        shown = {"postgres_world": "of which this world's backends"}
        return ", ".join(f"{shown.get(k, k)} {ms:.3f}" for k, ms in extra[key].items())

    disturbed = [
        f"{side} round {n}: {', '.join(servers)}"
        for side, extra in (("batch", v), ("AMQP", a))
        for n, servers in enumerate(extra["restarted"], start=1)
        if servers
    ]
    lines = [
        "",
        f"### batches: a {v['lines']}-line batch through /v1/files and"
        " /v1/batches, beside the same jobs through `SwitchyardClient.submit`",
        "",
        f"Window (`SWITCHYARD_BATCH_IN_FLIGHT`, and the AMQP side's unanswered jobs at most)"
        f" {v['window']}; worker {v['worker_concurrency']} calls in flight; mock 0 ms;"
        f" {v['rounds']} rounds (batch first in odd rounds). The batch is timed from the create"
        " call to its `completed_at`; its p50 column is that time.",
        "",
        "| figure | HTTP files/batches | AMQP submit (baseline) |",
        "| --- | --- | --- |",
        f"| per second, pooled (rounds) | {via['per_second']} ({v['round_per_second']}) |"
        f" {amqp['per_second']} ({a['round_per_second']}) |",
        f"| of the baseline (rounds) | **{v['vs_baseline_throughput']}** ({v['round_ratios']})"
        " | 1 |",
        f"| errors | {via['errors']} | {amqp['errors']}"
        + (f" {a['error_codes']}" if any(a["error_codes"]) else "")
        + " |",
        f"| upload s ({v['input_mib']} MiB) / validate / send and answer / finalize s |"
        + "; ".join(
            f" {u} / {p['validate']} / {p['send_and_answer']} / {p['finalize']}"
            for u, p in zip(v["upload_s"], v["phases_s"], strict=True)
        )
        + f" | p50 {amqp['p50_ms']} ms, p99 {amqp['p99_ms']} ms a job |",
    ]
    for name in ("scheduler", "gateway", "worker", "accountant"):
        batch_rss = "; ".join(_rss_cell(r.get(name)) for r in v["rss_rounds"])
        amqp_rss = "; ".join(_rss_cell(r.get(name)) for r in a["rss_rounds"])
        lines.append(
            f"| RSS MiB {name}, first→halfway→last (peak), each round | {batch_rss} |"
            f" {amqp_rss or '-'} |"
        )
    lines += [
        f"| Switchyard CPU ms per job | {v['cpu_s_per_job_ms']}: {cpu(v, 'cpu_ms_per_job')} |"
        f" {a['cpu_s_per_job_ms']}: {cpu(a, 'cpu_ms_per_job')} |",
        f"| others' CPU ms per job | {cpu(v, 'others_cpu_ms_per_job')} |"
        f" {cpu(a, 'others_cpu_ms_per_job')} |",
        f"| Postgres per job (`pg_stat_database`) | {_work(v)} | {_work(a)} |",
        f"| machine busy, cores, each round (to the usage queue drained) |"
        f" {v['machine_busy_cores']} | {a['machine_busy_cores']} |",
        f"| of which no process above, cores (another load) | {v['foreign_cores']} |"
        f" {a['foreign_cores']} |",
    ]
    if disturbed:
        lines += ["", "Disturbed (restarted by something else meanwhile): " + "; ".join(disturbed)]
    return "\n".join(lines) + "\n"


def append_table(results: dict[str, Any], out: Path) -> None:
    text = markdown(results)
    if text:
        with (out / "bench.md").open("a") as md:
            md.write(text)


def _cpu_named(name: str) -> float:
    total = 0.0
    for pid in pids_named(name):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _others(since: dict[str, float] | None = None) -> dict[str, float]:
    """Standalone: CPU seconds of RabbitMQ, Postgres and this producer."""
    now = {
        "rabbitmq": _cpu_named("beam.smp"),
        "postgres": _cpu_named("postgres"),
        "producer": cpu_seconds(os.getpid()),
    }
    if since is None:
        return now
    return {k: round(v - since.get(k, 0.0), 3) for k, v in now.items()}


def _throughput_main(args: argparse.Namespace) -> None:
    from broker.core.settings import Settings
    from broker.transport import fastpath
    from broker.transport.runtime import run_loop, tune_gc

    t = Throughput(lines=args.lines, rounds=args.rounds, window=args.in_flight)
    tune_gc()
    if Settings().amqp_fast_path:
        fastpath.install()
    profile = frozenset(k for k in args.profile.split(",") if k)
    runs = run_loop(throughput(t, args.out, _others, profile), Settings().event_loop)
    results = {"runs": [r.summary() for r in runs]}
    (args.out / "batch_throughput.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    sys.exit(1 if any(r.errors or not r.jobs for r in runs) else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--in-flight", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=Path("ops/bench/results"))
    parser.add_argument("--throughput", action="store_true", help="no faults: lines/s vs AMQP")
    parser.add_argument("--rounds", type=int, default=2, help="--throughput: rounds")
    parser.add_argument("--profile", default="", help="--throughput: kinds under cpuprofile.py")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        _throughput_main(args)
        return
    asyncio.run(_faults_main(args))


async def _faults_main(args: argparse.Namespace) -> None:
    faults = tuple(f for f in args.faults.split(",") if f)
    if "rabbitmq" in faults and (why := unavailable(RABBITMQ)):
        sys.exit(f"cannot run the rabbitmq fault: {why}")
    sizes = Sizes(latency_ms=35.0, concurrency=64, rabbitmq_down_s=5.0, answer_timeout_s=600.0)
    report = await run_batch_faults(args.lines, faults, args.out, sizes, args.in_flight)
    (args.out / "batch_faults.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    print(json.dumps(asdict(report), indent=2, default=str))
    sys.exit(1 if report.findings else 0)


if __name__ == "__main__":
    main()

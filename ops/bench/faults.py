"""The ``faults`` scenario (issue #15): each fault lands mid-run on Switchyard's processes and the
real servers; each run must end with every job answered once, the ledger equal to the mock
provider's own count of the calls it served, and the key's Redis counter equal to the ledger.

    python ops/bench/faults.py [--jobs N] [--faults worker,scheduler,...] [--small] [--out DIR]

Faults: ``worker``, ``scheduler``, ``accountant`` (SIGKILL mid-run, a new one started at once),
``rabbitmq`` (``rabbitmqctl stop_app``, ``start_app`` a few seconds later), ``postgres`` (stopped
for 60 s), ``redis`` (stopped for 30 s, started again empty), ``provider`` (the mock answers 20 %
500s and 10 % 429s for 5 s). A server stopped is started again, and waited for, whatever happens.
Each fault runs in a world of its own (``chaos.Stage``). Writes ``faults.json`` and ``faults.md``
to ``--out`` (default ``ops/bench/results``); the harness is ``chaos.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from redis.exceptions import RedisError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import FULL, SMALL, Books, Sizes, Stage

from broker.core.settings import Settings
from schemas import CompletionJob

PG_CLUSTER = ("15", "main")
REDIS_SERVER: tuple[str, ...] = ("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1")
REDIS_SERVER += ("-::1", "--port", "6379", "--save", "", "--appendonly", "no")
PROVIDER_FAULT = {"error_rate": 0.2, "rate_limit_rate": 0.1, "retry_after_s": 1}
# What the provider's errors may end a job with: 500s, 429s after the retries, an open circuit.
PROVIDER_CODES = frozenset({"server_error", "rate_limited", "provider_unavailable"})


@dataclass(frozen=True)
class Window:
    """When a fault began, and when its service was back (``time.monotonic()``)."""

    start: float
    end: float
    in_flight: int = 0  # calls the mock had in flight when it began


# -- servers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A local server a fault stops: how to stop and start it, and where it listens."""

    name: str
    url: str
    port: int  # when the URL names none
    stop: tuple[str, ...]
    start: tuple[tuple[str, ...], ...]

    def listening(self) -> bool:
        host, port = urlsplit(self.url).hostname, urlsplit(self.url).port or self.port
        with suppress(OSError), socket.create_connection((host, port), 2):
            return True
        return False


settings = Settings()
RABBITMQ = Server(
    "RabbitMQ",
    settings.amqp_url,
    5672,
    ("rabbitmqctl", "stop_app"),
    (("rabbitmqctl", "start_app"), ("rabbitmqctl", "await_startup")),
)
PG_CTL = ("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER)
POSTGRES = Server(
    "PostgreSQL", settings.database_url, 5432, (*PG_CTL, "stop"), ((*PG_CTL, "start"),)
)
REDIS_CLI = ("redis-cli", "-p", "6379", "shutdown", "nosave")
REDIS = Server("Redis", settings.redis_url, 6379, REDIS_CLI, (REDIS_SERVER,))


def _run(command: tuple[str, ...], check: bool = True) -> None:
    subprocess.run(command, check=check, capture_output=True, timeout=180)


@asynccontextmanager
async def stopped(server: Server) -> AsyncIterator[None]:
    """``server`` stopped inside the block; on the way out, whatever happened, started again
    and answering (a start of a server already running fails harmlessly)."""
    try:
        await asyncio.to_thread(_run, server.stop)
        yield
    finally:
        for command in server.start:
            await asyncio.to_thread(_run, command, False)
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(server.listening):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} did not come back within 120 s")
            await asyncio.sleep(0.2)


def unavailable(server: Server | None) -> str | None:
    """Why a fault stopping ``server`` cannot run here (not this machine's), or None."""
    if server is None:
        return None
    if urlsplit(server.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return f"stops {server.name}, which is not local ({urlsplit(server.url).hostname})"
    missing = [c[0] for c in (server.stop, *server.start) if shutil.which(c[0]) is None]
    return f"stops and starts {server.name}: needs {missing[0]}" if missing else None


# -- faults ------------------------------------------------------------------------------------


async def kill(kind: str, stage: Stage, *, answering: bool = False) -> Window:
    """SIGKILL the process of ``kind`` while calls are in flight (and, ``answering``, results
    going out) and start a new one; back when it consumes."""
    in_flight = await stage.busy()
    if answering:
        await stage.answering()
    start = time.monotonic()
    stage.kill(kind)
    stage.start(kind)
    await stage.consuming(kind, 60)
    return Window(start, time.monotonic(), in_flight)


async def outage(server: Server, down_s: str, stage: Stage) -> Window:
    """``server`` stopped for ``sizes.<down_s>``; while the broker is away the producer holds
    its waves (a publish cannot reach it; the persistent jobs already sent survive)."""
    if server is RABBITMQ:
        stage.accepting.clear()
    try:
        in_flight = await stage.busy()
        start = time.monotonic()
        async with stopped(server):
            await asyncio.sleep(float(getattr(stage.sizes, down_s)))
        return Window(start, time.monotonic(), in_flight)
    finally:
        stage.accepting.set()


async def provider(stage: Stage) -> Window:
    """The mock fails a share of its calls (500s, and 429s asking 1 s) for a while."""
    in_flight = await stage.busy()
    start = time.monotonic()
    try:
        await stage.mock(**PROVIDER_FAULT)
        await asyncio.sleep(stage.sizes.provider_fault_s)
    finally:
        await stage.mock(error_rate=0, rate_limit_rate=0)
    return Window(start, time.monotonic(), in_flight)


@dataclass(frozen=True)
class Fault:
    inject: Callable[[Stage], Coroutine[Any, Any, Window]]
    server: Server | None = None
    allowed: frozenset[str] = frozenset()  # error codes the fault may end a job with


FAULTS: dict[str, Fault] = {
    "worker": Fault(partial(kill, "worker", answering=True)),
    "scheduler": Fault(partial(kill, "scheduler")),
    "accountant": Fault(partial(kill, "accountant")),
    "rabbitmq": Fault(partial(outage, RABBITMQ, "rabbitmq_down_s"), RABBITMQ),
    "postgres": Fault(partial(outage, POSTGRES, "postgres_down_s"), POSTGRES),
    "redis": Fault(partial(outage, REDIS, "redis_down_s"), REDIS),
    "provider": Fault(provider, allowed=PROVIDER_CODES),
}


# -- one run, judged -----------------------------------------------------------------------------

QUIET_S = 6.0
"""How long books that do not balance must stay unchanged to be taken as settled: longer than
the accountant's sweep (5 s), so a call still due is not missed."""


async def offer(stage: Stage, jobs: list[CompletionJob], fault: Fault) -> Window:
    """Publish ``jobs`` in waves at ``sizes.rate``; the fault starts right after the wave
    ``sizes.fault_at`` of the way through (its jobs confirmed). Returns the fault's window."""
    sizes = stage.sizes
    waves = [jobs[i : i + sizes.wave] for i in range(0, len(jobs), sizes.wave)]
    at, begin = min(len(waves) - 1, int(len(waves) * sizes.fault_at)), time.monotonic()
    for n, wave in enumerate(waves):
        await asyncio.sleep(max(0.0, begin + n * sizes.wave / sizes.rate - time.monotonic()))
        await asyncio.wait_for(stage.accepting.wait(), sizes.answer_timeout_s)
        await asyncio.gather(*(stage.submit(job) for job in wave))
        if n == at:
            stage.fault = asyncio.create_task(fault.inject(stage))
    assert stage.fault is not None
    window: Window = await stage.fault
    return window


async def settle(stage: Stage, timeout_s: float) -> tuple[Books, float | None]:
    """Read the books until they balance, or stay unchanged for ``QUIET_S`` with every call
    accounted for, or ``timeout_s`` passes: the last reading, and when the books were first
    accounted for (``Books.accounted``)."""
    deadline, since = time.monotonic() + timeout_s, time.monotonic()
    last: Books | None = None
    accounted: float | None = None
    while True:
        with suppress(OSError, asyncpg.PostgresError, httpx.HTTPError, RedisError):
            books = await stage.books()  # a server may still be coming back
            if books.accounted() and accounted is None:
                accounted = time.monotonic()
            if books.balanced():
                return books, accounted
            if books != last:
                last, since = books, time.monotonic()
            elif books.accounted() and time.monotonic() - since > QUIET_S:
                return books, accounted
        if time.monotonic() > deadline:
            return (last if last is not None else await stage.books()), accounted
        await asyncio.sleep(0.5)


@dataclass
class Report:
    fault: str
    jobs: int
    answered: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # error code (or status) -> jobs
    duplicates: int = 0  # job ids with two different results at the results queue
    duplicate_after_s: list[float] = field(default_factory=list)  # the second's delay, each
    redelivered: int = 0  # results the broker delivered to the reader again, byte for byte
    resubmitted: int = 0  # publishes the producer made again
    books: Books = field(default_factory=Books)
    probe: bool = False  # a job sent after the run, for the scheduler to rebuild the counters
    fault_s: float = 0.0  # from the fault to its service back
    in_flight: int = 0  # calls the mock had in flight when the fault began
    first_after_s: float | None = None  # from the service back to the first result after
    last_after_s: float | None = None  # ... to the last result (negative: all came before)
    longest_gap_s: float = 0.0  # without any result, from the fault on
    total_s: float = 0.0  # from the first job offered to the last result
    accounted_after_s: float | None = None  # from the service back to the books accounted for
    findings: list[str] = field(default_factory=list)


async def run_fault(name: str, sizes: Sizes, out: Path) -> Report:
    """Run the fault ``name`` in a world of its own and judge it."""
    fault = FAULTS[name]
    stage = Stage(name, sizes, out)
    try:
        await stage.setup()
        jobs = [stage.job(str(i)) for i in range(sizes.jobs)]
        begin = time.monotonic()
        window = await offer(stage, jobs, fault)
        ids = [job.job_id for job in jobs]
        await stage.answers.wait(ids, sizes.answer_timeout_s)
        last = max(stage.answers.times(), default=time.monotonic())
        books, accounted = await settle(stage, sizes.settle_timeout_s)
        probe = not books.epoch  # Redis came back empty and nothing reserved since
        if probe:
            job = stage.job("probe")
            await stage.submit(job)
            await stage.answers.wait([job.job_id], 60)
            books, _ = await settle(stage, sizes.settle_timeout_s)
        report = measure(stage, ids, window, begin, last)
        report.books, report.probe = books, probe
        if accounted is not None:
            report.accounted_after_s = round(accounted - window.end, 2)
        report.findings = judge(report, fault.allowed)
        return report
    finally:
        if stage.fault is not None:  # not done if the run broke: its server comes back first
            stage.fault.cancel()
            with suppress(BaseException):
                await stage.fault
        await stage.teardown()


def measure(stage: Stage, ids: list[str], window: Window, begin: float, last: float) -> Report:
    answers = [got[0] for job in ids if (got := stage.answers.by_job.get(job))]
    times = [t for t in stage.answers.times() if t >= window.start]
    after = [t for t in times if t >= window.end]
    gaps = [b - a for a, b in zip([window.start, *times], times, strict=False)]
    return Report(
        fault=stage.name,
        jobs=len(ids),
        answered=len(answers),
        succeeded=sum(a.status == "succeeded" for a in answers),
        failed=dict(Counter(a.code or a.status for a in answers if a.status != "succeeded")),
        duplicates=len(stage.answers.duplicates()),
        duplicate_after_s=stage.answers.duplicates(),
        redelivered=stage.answers.redelivered(),
        resubmitted=stage.resubmitted,
        fault_s=round(window.end - window.start, 2),
        in_flight=window.in_flight,
        first_after_s=round(after[0] - window.end, 2) if after else None,
        last_after_s=round(last - window.end, 2),
        longest_gap_s=round(max(gaps, default=0.0), 2),
        total_s=round(last - begin, 2),
    )


def judge(r: Report, allowed: frozenset[str]) -> list[str]:
    """Every invariant that does not hold, in words."""
    b, found = r.books, []
    if r.answered < r.jobs:
        found.append(f"{r.jobs - r.answered} of {r.jobs} jobs never answered")
    if r.duplicates:
        after = ", ".join(f"{s:g}" for s in r.duplicate_after_s)
        found.append(f"{r.duplicates} jobs answered twice at the results queue ({after} s apart)")
    failed = {code: n for code, n in r.failed.items() if code not in allowed}
    if failed:
        found.append(f"jobs failed that the fault allows to succeed: {failed}")
    if b.usage_rows != b.mock_served:
        extra, why = b.usage_rows - b.mock_served, ""
        if 0 < extra <= b.swept_rows:  # a row with the provider's own usage was served
            why = " (swept calls recorded as started whose requests never reached the mock)"
        found.append(f"usage has {b.usage_rows} rows, the mock served {b.mock_served}{why}")
    if b.unsettled_calls:
        found.append(f"{b.unsettled_calls} calls never settled")
    if b.counter != b.ledger_tokens:
        diff = "no counter" if b.counter is None else f"{b.counter - b.ledger_tokens:+d}"
        held = f"{b.holds} reservations still held, {b.held_tokens} tokens of it"
        jobs = f", by jobs {', '.join(b.held_jobs)}" if b.held_jobs else ""
        found.append(
            f"the key's counter is {b.counter}, the ledger {b.ledger_tokens} ({diff}; {held}{jobs})"
        )
    return found


# -- the table -------------------------------------------------------------------------------


def row(r: Report) -> dict[str, str]:
    """The report's line of the table, by column."""
    b, swept = r.books, f" ({r.books.swept_rows} swept)" if r.books.swept_rows else ""
    return {
        "fault": r.fault,
        "jobs": str(r.jobs),
        "succeeded": str(r.succeeded),
        "failed": ", ".join(f"{code} {n}" for code, n in sorted(r.failed.items())) or "0",
        "dup.": str(r.duplicates),
        "usage rows / mock served": f"{b.usage_rows} / {b.mock_served}{swept}",
        "counter / ledger": f"{b.counter} / {b.ledger_tokens}" + (" (probe)" * r.probe),
        "fault s": f"{r.fault_s:g} ({r.in_flight} calls in flight)",
        "first result after s": _seconds(r.first_after_s),
        "last result after s": _seconds(r.last_after_s),
        "longest gap s": f"{r.longest_gap_s:g}",
        "books accounted after s": _seconds(r.accounted_after_s),
        "total s": f"{r.total_s:g}",
        "findings": "; ".join(r.findings) or "none",
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(reports: list[Report], skipped: dict[str, str]) -> str:
    columns = list(row(Report("", 0)))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row(r).values()) + " |" for r in reports]
    lines += [f"\n{name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="jobs per fault (default 2,000; --small 400)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated")
    parser.add_argument("--small", action="store_true", help="the test suite's sizes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    sizes = SMALL if args.small else FULL
    sizes = replace(sizes, jobs=args.jobs) if args.jobs else sizes
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    if unknown := [n for n in names if n not in FAULTS]:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for noisy in ("aio_pika", "aiormq"):  # the harness's connections, across a broker restart
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    reports: list[Report] = []
    skipped: dict[str, str] = {}
    started = time.monotonic()
    for name in names:
        if why := unavailable(FAULTS[name].server):
            skipped[name] = why
            continue
        print(f"fault {name}: {sizes.jobs} jobs ...", flush=True)
        try:
            report = await run_fault(name, sizes, args.out)
        except Exception as exc:  # the harness broke, not an invariant: say so, go on
            skipped[name] = f"the run broke: {exc!r} (logs: {args.out / 'logs' / name})"
            continue
        reports.append(report)
        print(" | ".join(f"{c}: {v}" for c, v in row(report).items()), flush=True)
    table = markdown(reports, skipped)
    print(f"\n{table}\n{time.monotonic() - started:.0f} s in all")
    (args.out / "faults.md").write_text(table)
    data = {"sizes": asdict(sizes), "reports": [asdict(r) for r in reports], "skipped": skipped}
    (args.out / "faults.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())

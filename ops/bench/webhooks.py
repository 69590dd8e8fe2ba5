"""The ``webhooks`` scenario: webhook deliveries per second through the dispatcher, beside the
same receiver POSTed to directly, measured in the same run.

    python ops/bench/webhooks.py [--deliveries 5000] [--concurrency 50] [--rounds 2] [--smoke]

A receiver process (aiohttp, answering 200 at once) counts what it gets and, from the
``sent_at`` each body carries, how long after being sent each arrived. Rounds alternate:

- **dispatcher**: ``N`` events published to ``<ns>.webhooks`` (confirmed, 200 in flight) for a
  dispatcher process (``switchyard webhooks``, ``concurrency`` attempts in flight), each
  recorded in Postgres, signed, POSTed and its attempt recorded; timed from the first publish to
  the receiver's ``N``-th request;
- **direct**: the same ``N`` signed POSTs from this process through the dispatcher's own HTTP
  client (``broker.webhooks.sender.Sender``) with the same concurrency.

Reported: deliveries/s of each, the dispatcher's over the direct, sent-to-received p50/p99, and
the CPU per delivery of the dispatcher, Postgres and RabbitMQ. From ``run.py``:
``webhooks.scenario(bench, _others_cpu)`` (the gateway scenario's sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import asyncpg
import httpx
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import Run, drive
from procs import REPO, Proc, Procs, cpu_seconds, free_port, pids_named, wait_http

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.names import Names
from broker.core.webhooks import signed_headers, webhook_body
from broker.transport.amqp import Publisher
from broker.transport.webhooks import job_webhook_id, publish_webhook
from broker.webhooks.sender import Sender
from schemas import WebhookRequest

if TYPE_CHECKING:
    from run import Bench

DISPATCHER = "from broker.cli.webhooks import webhooks_app; webhooks_app()"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLISH_IN_FLIGHT = 200
MAX_SECONDS = 300.0
NO_PROVIDER = {
    "id": "none",
    "type": "openai",
    "base_url": "http://127.0.0.1:9/v1",
    "models": {"m": {"input": 1, "output": 1}},
}


@dataclass
class Target:
    """Where the scenario runs: a namespace, a migrated database, a process starter."""

    amqp_url: str
    namespace: str
    database_url: str
    config_path: Path
    procs: Procs
    provider: dict[str, Any] | None = None


def _config(concurrency: int, provider: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dispatcher's config; ``provider``: the bench's own, if other processes read it."""
    return {
        "providers": [provider or NO_PROVIDER],
        "webhooks": {
            "secret": SECRET,
            "allow": ["127.0.0.1"],
            "concurrency": concurrency,
            "timeout_s": 30,
            "retry_schedule_s": [1, 1, 1],
            "jitter": 0,
        },
    }


def _cpu(
    procs: list[Proc], others: Callable[..., dict[str, float]]
) -> Callable[[], dict[str, float]]:
    """A reading of CPU seconds since the call, of ``procs`` and of ``others``."""
    for proc in procs:
        proc.mark()
    before = others()

    def since() -> dict[str, float]:
        used = {p.name: round(p.cpu_since_mark(), 3) for p in procs}
        used.update(others(since=before))
        return used

    return since


class Receiver:
    """The receiver process's counters, over HTTP (one client, so polling costs little)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self.http.get("/_stats")).json()
        return data

    async def count(self) -> int:
        return int((await self.http.get("/_count")).json())

    async def reset(self) -> None:
        (await self.http.post("/_reset")).raise_for_status()

    async def until(self, count: int, deadline: float) -> int:
        # Polling is the only way to see another process's count.
        while (got := await self.count()) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return got


def _event(url: str, i: int) -> WebhookRequest:
    """An event as a job's result would make it; ``sent_at`` dates it for the receiver."""
    job_id = f"bench-{secrets.token_hex(6)}-{i}"
    return WebhookRequest(
        webhook_id=job_webhook_id(job_id),
        url=url,  # type: ignore[arg-type]
        type="job.succeeded",
        data={"job_id": job_id, "sent_at": time.time(), "content": "x" * 200},
        occurred_at=utcnow(),
    )


async def _consumed(amqp_url: str, queue: str, timeout_s: float = 30.0) -> None:
    """Wait until a consumer (the dispatcher) is on ``queue``: a publish before it is declared
    would be dropped."""
    connection = await aio_pika.connect_robust(amqp_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                if declared.declaration_result.consumer_count:
                    return
            except aio_pika.exceptions.ChannelClosed:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
            await asyncio.sleep(0.2)
    finally:
        await connection.close()
    raise TimeoutError(f"no dispatcher consumed {queue} within {timeout_s:g} s")


async def _through_dispatcher(target: Target, receiver: Receiver, name: str, total: int) -> Run:
    names = Names(target.namespace)
    await receiver.reset()
    connection = await aio_pika.connect_robust(target.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    publisher = Publisher(channel)
    limit = asyncio.Semaphore(PUBLISH_IN_FLIGHT)
    run = Run(name)
    started = time.perf_counter()

    async def publish(i: int) -> None:
        async with limit:
            await publish_webhook(publisher, names, _event(f"{receiver.url}/hook", i))

    try:
        await asyncio.gather(*(publish(i) for i in range(total)))
        got = await receiver.until(total, time.monotonic() + MAX_SECONDS)
    finally:
        await connection.close()
    run.seconds = time.perf_counter() - started
    stats = await receiver.stats()
    run.jobs, run.errors = min(got, total), max(0, total - got)
    run.latencies_ms = stats["latencies_ms"]
    return run


async def _direct(receiver: Receiver, name: str, total: int, concurrency: int) -> Run:
    sender = Sender(Config.model_validate(_config(concurrency)).webhooks)
    await receiver.reset()
    try:

        async def post(i: int) -> bool:
            request = _event(f"{receiver.url}/hook", i)
            body = webhook_body(request)
            headers = signed_headers([SECRET], request.webhook_id, int(time.time()), body)
            headers["content-type"] = "application/json"
            answer = await sender.post(f"{receiver.url}/hook", headers, body)
            return answer.status_code == 200

        run = await drive(name, post, total=total, in_flight=concurrency, max_seconds=MAX_SECONDS)
    finally:
        await sender.aclose()
    run.latencies_ms = (await receiver.stats())["latencies_ms"]
    return run


async def measure(
    target: Target,
    others: Callable[..., dict[str, float]],
    *,
    deliveries: int,
    concurrency: int,
    rounds: int,
) -> list[Run]:
    """Start a receiver and a dispatcher, alternate the two sides ``rounds`` times, stop both."""
    port = free_port()
    receiver_proc = target.procs.start(
        "webhook-receiver", str(Path(__file__)), "--receiver", str(port)
    )
    receiver = Receiver(f"http://127.0.0.1:{port}")
    await asyncio.to_thread(wait_http, f"{receiver.url}/_stats")
    target.config_path.write_text(yaml.safe_dump(_config(concurrency, target.provider)))
    dispatcher = target.procs.start("webhooks", "-c", DISPATCHER)
    await _consumed(target.amqp_url, Names(target.namespace).webhooks)
    sides: dict[str, list[Run]] = {"direct": [], "dispatcher": []}
    cpu: dict[str, dict[str, float]] = {"direct": {}, "dispatcher": {}}
    try:
        await _through_dispatcher(target, receiver, "warm-up", max(50, deliveries // 10))
        per_round = max(1, deliveries // rounds)
        for _ in range(rounds):
            for side in ("direct", "dispatcher"):
                reading = _cpu([dispatcher, receiver_proc], others)
                if side == "direct":
                    run = await _direct(receiver, side, per_round, concurrency)
                else:
                    run = await _through_dispatcher(target, receiver, side, per_round)
                sides[side].append(run)
                for key, seconds in reading().items():
                    cpu[side][key] = cpu[side].get(key, 0.0) + seconds
    finally:
        target.procs.stop(dispatcher)
        target.procs.stop(receiver_proc)
        await receiver.http.aclose()
    title = f"webhooks, {concurrency} in flight:"
    direct = Run.merged(f"{title} direct POSTs (same client)", sides["direct"])
    via = Run.merged(f"{title} through the dispatcher", sides["dispatcher"])
    for side, run in (("direct", direct), ("dispatcher", via)):
        run.extra["cpu_ms_per_delivery"] = {
            k: round(v / max(run.jobs, 1) * 1000, 3) for k, v in cpu[side].items()
        }
    via.extra["vs_baseline"] = round(via.per_second / max(direct.per_second, 1e-9), 3)
    via.extra["round_per_second"] = [round(r.per_second, 1) for r in sides["dispatcher"]]
    return [direct, via]


async def scenario(bench: Bench, others_cpu: Callable[..., dict[str, float]]) -> list[Run]:
    """For ``run.py``: the bench's namespace and database, the gateway scenario's sizes."""
    s = bench.sizes
    target = Target(
        bench.amqp_url,
        bench.names.namespace,
        bench.database_url,
        bench.config_path,
        bench.procs,
        bench.provider(s.gateway_clients),
    )
    try:
        return await measure(
            target,
            others_cpu,
            deliveries=s.gateway_jobs,
            concurrency=s.gateway_clients,
            rounds=s.rounds,
        )
    finally:
        await _drop_queues(bench.amqp_url, bench.names.webhooks)


# --- standalone ---------------------------------------------------------------------------


def _cpu_named(name: str) -> float:
    """CPU seconds of the processes called ``name`` (one that ends meanwhile counts 0)."""
    total = 0.0
    for pid in pids_named(name):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _others(since: dict[str, float] | None = None) -> dict[str, float]:
    now = {
        "rabbitmq": _cpu_named("beam.smp"),
        "postgres": _cpu_named("postgres"),
        "producer": cpu_seconds(os.getpid()),
    }
    if since is None:
        return now
    return {k: round(v - since.get(k, 0.0), 3) for k, v in now.items()}


async def _drop_queues(amqp_url: str, *queues: str) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    await connection.close()


async def standalone(deliveries: int, concurrency: int, rounds: int, out: Path) -> list[Run]:
    """A database and a namespace of its own, removed at the end."""
    from broker.core.migrate import upgrade
    from broker.core.settings import Settings

    settings, token = Settings(), secrets.token_hex(3)
    namespace, db_name = f"bench-{token}", f"switchyard_bench_{token}"
    admin_dsn = settings.database_url.replace("+asyncpg", "")
    database_url = settings.database_url.rsplit("/", 1)[0] + f"/{db_name}"
    config_path = out / "bench-webhooks-config.yaml"
    env = dict(os.environ)
    env.update(
        SWITCHYARD_AMQP_URL=settings.amqp_url,
        SWITCHYARD_DATABASE_URL=database_url,
        SWITCHYARD_CONFIG=str(config_path),
        SWITCHYARD_NAMESPACE=namespace,
        SWITCHYARD_LOG_LEVEL="WARNING",
    )
    procs = Procs(env, out / "logs")
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    await admin.close()
    try:
        await asyncio.to_thread(upgrade, database_url)
        target = Target(settings.amqp_url, namespace, database_url, config_path, procs)
        return await measure(
            target, _others, deliveries=deliveries, concurrency=concurrency, rounds=rounds
        )
    finally:
        procs.stop_all()
        await _drop_queues(settings.amqp_url, Names(namespace).webhooks, Names(namespace).dead)
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()


def serve_receiver(port: int) -> None:
    """The receiver process: 200 to every POST, counting, and each body's sent-to-received."""
    from aiohttp import web

    state: dict[str, Any] = {"count": 0, "latencies_ms": []}

    async def hook(request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        sent = data["data"].get("sent_at")
        state["count"] += 1
        if sent is not None:
            state["latencies_ms"].append((time.time() - sent) * 1000)
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(state), content_type="application/json")

    async def count(request: web.Request) -> web.Response:
        return web.Response(body=b"%d" % state["count"], content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        state.update(count=0, latencies_ms=[])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_count", count)
    app.router.add_post("/_reset", reset)
    app.router.add_post("/{tail:.*}", hook)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="300 deliveries: does it work")
    parser.add_argument("--out", type=Path, default=REPO / "ops" / "bench" / "results")
    args = parser.parse_args()
    if args.receiver is not None:
        serve_receiver(args.receiver)
        return
    from broker.transport.runtime import run_loop, tune_gc

    args.out.mkdir(parents=True, exist_ok=True)
    deliveries = 300 if args.smoke else args.deliveries
    tune_gc()
    runs = run_loop(standalone(deliveries, args.concurrency, args.rounds, args.out), "uvloop")
    print("| side | deliveries | errors | per s | p50 ms | p99 ms | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        notes = {k: v for k, v in run.extra.items() if k not in ("rounds", "capped")}
        print(
            f"| {run.name} | {run.jobs} | {run.errors} | {run.per_second:.1f} "
            f"| {run.percentile(50):.2f} | {run.percentile(99):.2f} | {notes} |"
        )
    if any(run.errors or not run.jobs for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()

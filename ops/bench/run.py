"""Switchyard's benchmark: the pipeline against the bare stack, measured in the same run.

    python ops/bench/run.py [--smoke] [--out DIR]

Every figure is reported with the same-run baseline beside it, since absolute times on a shared
2-core machine drift. Each scenario is bounded in count and time. Writes ``bench.json``,
``bench.md`` and ``bench.png`` to ``--out`` (default ``ops/bench/results``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batches as batches_bench
import gateway as gateway_bench
import usage_report as usage_report_bench
import webhooks as webhooks_bench
from bare import JSON_HEADERS, BareClient
from load import Run, drive
from procs import (
    REPO,
    Proc,
    Procs,
    cli,
    cpu_seconds,
    free_port,
    machine_busy_s,
    pids_named,
    wait_http,
)
from report import write_reports

from broker.client import SwitchyardClient
from broker.core.config import ProviderConfig
from broker.core.migrate import upgrade
from broker.core.names import Names
from broker.core.settings import Settings
from broker.transport import fastpath
from broker.transport.amqp import PARK_DELAYS_S
from broker.transport.runtime import run_loop, tune_gc
from workers.http import make_http_client, post

IDLE_GAP_S = 0.005
"""About a one-in-flight job's time through the pipeline: how long each of its processes waits
between jobs."""


@dataclass(frozen=True)
class Sizes:
    throughput_jobs: int = 20_000
    throughput_in_flight: int = 200
    latency_jobs: int = 600
    many_jobs: int = 10_000
    many_cap: int = 500
    many_latency_ms: int = 1000
    scale_jobs: int = 5_000
    gateway_latency_jobs: int = 300
    gateway_jobs: int = 5_000
    gateway_clients: int = 50
    batch_lines: int = 20_000  # a batch's lines, and the AMQP side's jobs (batches.py)
    batch_rounds: int = 2  # each a batch and an AMQP run of batch_lines
    batch_window: int = 2_000  # SWITCHYARD_BATCH_IN_FLIGHT (its default)
    usage_rows: int = 2_000_000  # generated usage rows a cost report reads (usage_report.py)
    usage_runs: int = 5  # timed reports of each kind
    usage_trigger_rounds: int = 20  # 500-row inserts with the rollup trigger and without
    rounds: int = 4
    warmup_jobs: int = 300
    max_seconds: float = 150.0


SMOKE = Sizes(
    throughput_jobs=300,
    throughput_in_flight=50,
    latency_jobs=20,
    many_jobs=400,
    many_cap=100,
    many_latency_ms=200,
    scale_jobs=100,
    gateway_latency_jobs=20,
    gateway_jobs=200,
    gateway_clients=10,
    batch_lines=300,
    batch_window=100,  # below the lines, so the runner waits for room in its window
    usage_rows=20_000,
    usage_runs=2,
    usage_trigger_rounds=3,
    rounds=2,
    warmup_jobs=20,
    max_seconds=30.0,
)


class Bench:
    def __init__(self, sizes: Sizes, out: Path, profile: frozenset[str] = frozenset()) -> None:
        settings = Settings()
        self.sizes = sizes
        self.out = out
        self.profile = profile  # kinds of process to run under ``cpuprofile.py``
        self.start_timeout_s = 30.0
        self.scenario = ""
        self._started = 0
        self.amqp_url = settings.amqp_url
        self.token = secrets.token_hex(3)
        self.names = Names(f"bench-{self.token}")
        self.db_name = f"switchyard_bench_{self.token}"
        admin = settings.database_url.replace("+asyncpg", "")
        self.admin_dsn = admin
        self.database_url = settings.database_url.rsplit("/", 1)[0] + f"/{self.db_name}"
        self.mock_port = free_port()
        self.mock_url = f"http://127.0.0.1:{self.mock_port}"
        self.config_path = out / "bench-config.yaml"
        env = dict(os.environ)
        env.update(
            SWITCHYARD_AMQP_URL=self.amqp_url,
            SWITCHYARD_DATABASE_URL=self.database_url,
            SWITCHYARD_CONFIG=str(self.config_path),
            SWITCHYARD_NAMESPACE=self.names.namespace,
            SWITCHYARD_LOG_LEVEL="WARNING",
        )
        self.procs = Procs(env, out / "logs")
        self.bare_queue = f"{self.names.namespace}.bare"

    # -- setup and teardown -------------------------------------------------------------------

    async def setup(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        await admin.close()
        await asyncio.to_thread(upgrade, self.database_url)
        self.procs.start("mock-provider", *cli("mock-provider", "--port", str(self.mock_port)))
        await asyncio.to_thread(wait_http, f"{self.mock_url}/healthz")

    async def teardown(self) -> None:
        self.procs.stop_all()
        connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await connection.channel()
        for queue in (
            self.names.jobs,
            self.names.reroute,
            self.names.usage,
            self.names.dead,
            self.names.alerts,
            *(self.names.park(d) for d in PARK_DELAYS_S),
            *(self.names.provider("mock", lane) for lane in range(8)),
            self.bare_queue,
        ):
            await channel.queue_delete(queue)
        await channel.exchange_delete(self.names.config)
        await connection.close()
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        await admin.close()

    def mock(self, **settings: Any) -> None:
        httpx.put(f"{self.mock_url}/_mock/config", json=settings).raise_for_status()
        httpx.post(f"{self.mock_url}/_mock/reset").raise_for_status()

    def mock_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.mock_url}/_mock/stats").json()
        return stats

    def provider(self, concurrency: int) -> dict[str, Any]:
        return {
            "id": "mock",
            "type": "openai",
            "base_url": f"{self.mock_url}/v1",
            "concurrency": concurrency,
            "timeout_s": 60,
            "models": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}},
        }

    async def consumers(self, queue: str) -> int:
        connection = await aio_pika.connect_robust(self.amqp_url)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.consumer_count or 0)
        except Exception:
            return 0
        finally:
            await connection.close()

    async def depth(self, queue: str) -> int:
        connection = await aio_pika.connect_robust(self.amqp_url)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await connection.close()

    async def pipeline(
        self, *, concurrency: int, workers: int = 1, schedulers: int = 1
    ) -> list[Proc]:
        self.config_path.write_text(yaml.safe_dump({"providers": [self.provider(concurrency)]}))
        self._started += 1
        started = [self._start(f"scheduler-{i}", "scheduler") for i in range(schedulers)]
        started += [
            self._start(f"worker-{i}", "worker", "--provider", "mock") for i in range(workers)
        ]
        started.append(self._start("accountant", "accountant"))
        deadline = time.monotonic() + self.start_timeout_s
        want = {
            self.names.jobs: schedulers,
            self.names.provider("mock"): workers,
            self.names.usage: 1,
        }
        while any([await self.consumers(q) < n for q, n in want.items()]):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the pipeline did not start consuming within {self.start_timeout_s:g} s"
                )
            await asyncio.sleep(0.2)
        for proc in started:
            proc.mark()
        return started

    def _start(self, name: str, *command: str) -> Proc:
        """``switchyard COMMAND``, under the CPU sampler when ``--profile`` names its kind."""
        if command[0] not in self.profile:
            return self.procs.start(name, *cli(*command))
        out = self.out / f"profile-{self._started}-{self.scenario}-{name}.txt"
        return self.procs.start(
            name, str(REPO / "ops" / "bench" / "cpuprofile.py"), str(out), *command
        )

    def stop(self, procs: list[Proc]) -> None:
        for proc in procs:
            self.procs.stop(proc)

    async def bare(self, concurrency: int) -> Proc:
        proc = self.procs.start(
            "bare",
            str(REPO / "ops" / "bench" / "bare.py"),
            self.amqp_url,
            self.bare_queue,
            f"{self.mock_url}/v1",
            str(concurrency),
        )
        deadline = time.monotonic() + self.start_timeout_s
        while await self.consumers(self.bare_queue) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the bare worker did not start consuming within {self.start_timeout_s:g} s"
                )
            await asyncio.sleep(0.2)
        proc.mark()
        return proc

    # -- load ---------------------------------------------------------------------------------

    async def switchyard_load(self, name: str, total: int, in_flight: int) -> Run:
        client = await SwitchyardClient.connect(self.amqp_url, namespace=self.names.namespace)
        async with client:

            async def call(i: int) -> bool:
                result = await client.complete(
                    [{"role": "user", "content": f"bench question {i}"}],
                    model="gpt-4o-mini",
                    priority=i % 10,
                    timeout_s=120,
                )
                return result.status.value == "succeeded"

            return await drive(
                name, call, total=total, in_flight=in_flight, max_seconds=self.sizes.max_seconds
            )

    async def bare_load(self, name: str, total: int, in_flight: int) -> Run:
        async with BareClient(self.amqp_url, self.bare_queue) as client:

            async def call(i: int) -> bool:
                body = json.dumps(
                    {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": f"bench question {i}"}],
                    }
                ).encode()
                reply = json.loads(await client.call(body, priority=i % 10))
                return "choices" in reply

            return await drive(
                name, call, total=total, in_flight=in_flight, max_seconds=self.sizes.max_seconds
            )

    async def direct_load(self, name: str, total: int, pause_s: float = 0.0) -> Run:
        provider = ProviderConfig.model_validate(self.provider(1))
        async with make_http_client(provider) as http:

            async def call(i: int) -> bool:
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"bench question {i}"}],
                }
                response = await post(
                    http, f"{self.mock_url}/v1/chat/completions", orjson.dumps(body), JSON_HEADERS
                )
                return response.status_code == 200

            return await drive(
                name,
                call,
                total=total,
                in_flight=1,
                max_seconds=self.sizes.max_seconds,
                pause_s=pause_s,
            )

    async def drained(self, started: float) -> float:
        """Seconds from ``started`` until the accountant has emptied the usage queue."""
        deadline = time.monotonic() + 60
        # Polling the broker is the only way to see another process's queue drain.
        while await self.depth(self.names.usage) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return round(time.perf_counter() - started, 2)

    # -- scenarios ----------------------------------------------------------------------------

    async def throughput(self) -> list[Run]:
        """Rounds that alternate the bare loop and Switchyard (both kept running), so a drift
        of the shared machine falls on both sides alike."""
        s = self.sizes
        self.mock(latency_ms=0)
        bare = await self.bare(s.throughput_in_flight)
        procs = await self.pipeline(concurrency=s.throughput_in_flight)
        await self.bare_load("warm-up", s.warmup_jobs, s.throughput_in_flight)
        await self.switchyard_load("warm-up", s.warmup_jobs, s.throughput_in_flight)
        per_round = max(1, s.throughput_jobs // s.rounds)
        sides: dict[str, list[Run]] = {"baseline": [], "switchyard": []}
        cpu: dict[str, dict[str, float]] = {"baseline": {}, "switchyard": {}}
        others: dict[str, dict[str, float]] = {"baseline": {}, "switchyard": {}}
        busy = {"baseline": 0.0, "switchyard": 0.0}
        for _ in range(s.rounds):
            for side, side_procs in (("baseline", [bare]), ("switchyard", procs)):
                for proc in side_procs:
                    proc.mark()
                others_before, busy_before = _others_cpu(), machine_busy_s()
                if side == "baseline":
                    run = await self.bare_load(side, per_round, s.throughput_in_flight)
                else:
                    run = await self.switchyard_load(side, per_round, s.throughput_in_flight)
                sides[side].append(run)
                busy[side] += machine_busy_s() - busy_before
                for name, used in _others_cpu(since=others_before).items():
                    others[side][name] = others[side].get(name, 0.0) + used
                for proc in side_procs:
                    cpu[side][proc.name] = cpu[side].get(proc.name, 0.0) + proc.cpu_since_mark()
        drained = await self.drained(time.perf_counter())
        self.stop([bare, *procs])
        baseline = Run.merged("throughput: baseline", sides["baseline"])
        run = Run.merged("throughput: switchyard", sides["switchyard"])
        for side, merged in (("baseline", baseline), ("switchyard", run)):
            merged.extra["cpu_s"] = {k: round(v, 2) for k, v in cpu[side].items()}
            merged.extra["cpu_s_per_job_ms"] = round(
                sum(cpu[side].values()) / max(merged.jobs, 1) * 1000, 3
            )
            merged.extra["others_cpu_s"] = {k: round(v, 2) for k, v in others[side].items()}
            merged.extra["machine_busy_cores"] = round(busy[side] / merged.seconds, 2)
        run.extra["accountant_drained_s_after_last_reply"] = drained
        run.extra["vs_baseline_throughput"] = round(
            run.per_second / max(baseline.per_second, 1e-9), 3
        )
        run.extra["round_ratios"] = [
            round(sy.per_second / max(b.per_second, 1e-9), 3)
            for b, sy in zip(sides["baseline"], sides["switchyard"], strict=True)
        ]
        run.extra["vs_baseline_p50"] = round(run.percentile(50) / baseline.percentile(50), 3)
        return [baseline, run]

    async def added_latency(self) -> list[Run]:
        """One job in flight: rounds alternating a direct HTTP call, the same call after the mock
        and the caller idled ``IDLE_GAP_S``, the bare loop and Switchyard (all kept running).

        The idle row is the machine's part: at one in flight every process a job passes has
        been waiting in ``epoll``, and waking one costs more than the work it then does
        (measured here: the same call 0.36-0.44 ms back to back, 0.81-0.99 ms after 4 ms idle)."""
        s = self.sizes
        self.mock(latency_ms=0)
        bare = await self.bare(8)
        procs = await self.pipeline(concurrency=8)
        await self.switchyard_load("warm-up", s.warmup_jobs, 1)
        per_round = max(1, s.latency_jobs // s.rounds)
        sides: dict[str, list[Run]] = {"direct": [], "idle": [], "baseline": [], "switchyard": []}
        for _ in range(s.rounds):
            sides["direct"].append(await self.direct_load("direct", per_round))
            sides["idle"].append(await self.direct_load("idle", per_round, IDLE_GAP_S))
            sides["baseline"].append(await self.bare_load("baseline", per_round, 1))
            sides["switchyard"].append(await self.switchyard_load("switchyard", per_round, 1))
        self.stop([bare, *procs])
        direct = Run.merged("one in flight: direct HTTP", sides["direct"])
        idle = Run.merged(
            f"one in flight: direct HTTP after {IDLE_GAP_S * 1000:g} ms idle", sides["idle"]
        )
        baseline = Run.merged("one in flight: baseline", sides["baseline"])
        run = Run.merged("one in flight: switchyard", sides["switchyard"])
        for r in (idle, baseline, run):
            r.extra["added_p50_ms"] = round(r.percentile(50) - direct.percentile(50), 2)
            r.extra["added_p99_ms"] = round(r.percentile(99) - direct.percentile(99), 2)
        run.extra["p50_minus_baseline_ms"] = round(run.percentile(50) - baseline.percentile(50), 2)
        return [direct, idle, baseline, run]

    async def many_in_flight(self) -> list[Run]:
        """The pipeline against the ideal (the cap over the latency), with the bare loop under
        the same load beside it: on a small machine the ideal may be beyond either."""
        s = self.sizes
        self.mock(latency_ms=s.many_latency_ms)
        ideal = s.many_cap / (s.many_latency_ms / 1000)
        bare = await self.bare(s.many_cap)
        baseline = await self.bare_load("many in flight: baseline", s.many_jobs, s.many_cap * 2)
        self.stop([bare])
        baseline.extra["vs_ideal"] = round(baseline.per_second / ideal, 3)
        self.mock(latency_ms=s.many_latency_ms)  # resets the mock's stats
        procs = await self.pipeline(concurrency=s.many_cap)
        sampler = asyncio.create_task(self._sample(procs))
        run = await self.switchyard_load("many in flight: switchyard", s.many_jobs, s.many_cap * 2)
        sampler.cancel()
        run.extra["ideal_per_second"] = ideal
        run.extra["vs_ideal"] = round(run.per_second / ideal, 3)
        run.extra["vs_baseline"] = round(run.per_second / max(baseline.per_second, 1e-9), 3)
        run.extra["mock_max_in_flight"] = self.mock_stats()["max_in_flight"]
        run.extra["rss_mib"] = {
            p.name: {
                "first": round(p.rss_samples[0] / 1024, 1) if p.rss_samples else None,
                # halfway against last tells growth that levels off from growth that goes on
                "half": round(p.rss_samples[len(p.rss_samples) // 2] / 1024, 1)
                if p.rss_samples
                else None,
                "last": round(p.rss_samples[-1] / 1024, 1) if p.rss_samples else None,
                "peak": round(max(p.rss_samples, default=0) / 1024, 1),
            }
            for p in procs
        }
        self.stop(procs)
        return [baseline, run]

    async def _sample(self, procs: list[Proc]) -> None:
        while True:
            for proc in procs:
                proc.sample()
            await asyncio.sleep(1.0)

    async def scale_out(self) -> list[Run]:
        s = self.sizes
        self.mock(latency_ms=0)
        runs = []
        for workers, schedulers in ((1, 1), (2, 1), (1, 2), (2, 2)):
            procs = await self.pipeline(
                concurrency=s.throughput_in_flight, workers=workers, schedulers=schedulers
            )
            run = await self.switchyard_load(
                f"scale-out: {workers} worker(s), {schedulers} scheduler(s)",
                s.scale_jobs,
                s.throughput_in_flight,
            )
            self.stop(procs)
            runs.append(run)
        return runs

    async def gateway(self) -> list[Run]:
        """The HTTP gateway against a direct call to the mock and ``SwitchyardClient``."""
        return await gateway_bench.scenario(self, _others_cpu)

    async def batches(self) -> list[Run]:
        """A stored batch through the gateway's /v1/files and /v1/batches against the same jobs
        through ``SwitchyardClient.submit`` (``batches.py``: a world of its own)."""
        return await batches_bench.scenario(self, _others_cpu)

    async def webhooks(self) -> list[Run]:
        """Webhook deliveries through the dispatcher against the same POSTs made directly."""
        return await webhooks_bench.scenario(self, _others_cpu)

    async def usage_report(self) -> list[Run]:
        """A month's cost report by key over generated usage rows through the daily rollup,
        against the same report over ``usage`` alone (``usage_report.py``: a database of its
        own)."""
        return await usage_report_bench.scenario(self)


def _others_cpu(since: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds of what else the pipeline drives: RabbitMQ, Postgres, and this producer."""
    now = {
        "rabbitmq": sum(cpu_seconds(p) for p in pids_named("beam.smp")),
        "postgres": sum(cpu_seconds(p) for p in pids_named("postgres")),
        "producer": cpu_seconds(os.getpid()),
    }
    if since is None:
        return now
    return {k: round(v - since.get(k, 0.0), 2) for k, v in now.items()}


def append_webhooks(results: dict[str, Any], out: Path) -> None:
    """bench.md's lines of the webhooks scenario: what its table's notes leave out."""
    rows = [r for r in results["runs"] if r["name"].startswith("webhooks")]
    if not rows:
        return
    lines = ["", "### webhooks: deliveries per second", ""]
    for row in rows:
        extra = row["extra"]
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in extra.get("cpu_ms_per_delivery", {}).items())
        rounds = extra.get("round_per_second")
        lines.append(
            f"- {row['name']}: {row['per_second']}/s"
            + (f" (rounds {rounds}, {extra['vs_baseline']} of the direct POSTs)" if rounds else "")
            + f"; sent to received p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms;"
            f" CPU ms per delivery: {cpu}"
        )
    with (out / "bench.md").open("a") as md:
        md.write("\n".join(lines) + "\n")


async def main(
    sizes: Sizes, out: Path, scenarios: list[str], profile: frozenset[str]
) -> dict[str, Any]:
    bench = Bench(sizes, out, profile)
    await bench.setup()
    runs: list[Run] = []
    started = time.perf_counter()
    try:
        for scenario in scenarios:
            print(f"== {scenario}", flush=True)
            bench.scenario = scenario
            for run in await getattr(bench, scenario)():
                print(
                    f"   {run.name}: {run.per_second:.1f}/s p50 {run.percentile(50):.2f} ms",
                    flush=True,
                )
                runs.append(run)
    finally:
        await bench.teardown()
    return {
        "sizes": sizes.__dict__,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count()},
        "settings": {
            "http_transport": Settings().http_transport,
            "event_loop": Settings().event_loop,
            "amqp_fast_path": Settings().amqp_fast_path,
        },
        "runs": [r.summary() for r in runs],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few hundred jobs: does it work")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every job count (quick comparisons)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "ops" / "bench" / "results")
    parser.add_argument(
        "--scenarios",
        default="throughput,added_latency,many_in_flight,scale_out,gateway,batches,webhooks,"
        "usage_report",
        help="comma-separated subset",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated process kinds (scheduler, worker, accountant, gateway) to run under"
        " cpuprofile.py; their samples go to --out as profile-*.txt",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else Sizes()
    if args.scale != 1.0:
        sizes = replace(
            sizes,
            **{
                f: max(1, int(getattr(sizes, f) * args.scale))
                for f in (
                    "throughput_jobs",
                    "latency_jobs",
                    "many_jobs",
                    "scale_jobs",
                    "gateway_latency_jobs",
                    "gateway_jobs",
                    "batch_lines",
                    "usage_rows",
                )
            },
        )
    profile = frozenset(kind for kind in args.profile.split(",") if kind)
    # The producers (both sides') run on the event loop, the collector settings and the AMQP
    # path (fast unless SWITCHYARD_AMQP_FAST_PATH is off) of Switchyard's processes.
    tune_gc()
    if Settings().amqp_fast_path:
        fastpath.install()
    results = run_loop(
        main(sizes, args.out, args.scenarios.split(","), profile), Settings().event_loop
    )
    write_reports(results, args.out)
    gateway_bench.append_targets(results, args.out)
    batches_bench.append_table(results, args.out)
    append_webhooks(results, args.out)
    usage_report_bench.append_lines(results, args.out)
    print((args.out / "bench.md").read_text())
    broken = [r["name"] for r in results["runs"] if r["errors"] or not r["jobs"]]
    if args.smoke and broken:
        sys.exit(f"bench smoke: jobs failed or none finished in: {', '.join(broken)}")

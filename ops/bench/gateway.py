"""The ``gateway`` scenario: ``switchyard gateway`` (OpenAI's ``POST /v1/chat/completions`` in
front of the queue pipeline) against the same call made straight to the mock provider.

    python ops/bench/run.py --scenarios gateway [--profile gateway]

Both sides are called by the same aiohttp client code with the same bodies, one side at the mock's
own ``/v1/chat/completions`` (0 ms), the other at the gateway, whose worker calls that mock. A
third side, the same pipeline through ``SwitchyardClient``, tells what the gateway itself adds:

- **one in flight**: rounds alternating the sides (after a warm-up), JSON and SSE; the gateway's
  p50/p99 over the direct call's, and for SSE its time to the first ``data:`` line over the
  direct stream's;
- **concurrent clients** (50), each sending JSON requests back to back, rounds alternating the
  sides: requests/s, and the CPU of every Switchyard process (gateway, scheduler, worker,
  accountant), RabbitMQ, Postgres, the mock and this producer per request.

Every answer must be a 200 with a ``chat.completion`` body (a stream: ``chat.completion.chunk``
events then ``[DONE]``); anything else counts as an error. The targets (``TARGETS``) are printed
beside the figures, not asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from load import Run, drive
from procs import Proc, free_port, machine_busy_s, wait_http

if TYPE_CHECKING:
    from run import Bench

TARGETS = {
    "added_p50_ms": 4.0,  # at one in flight, JSON, at most
    "per_second": 500.0,  # at 50 concurrent clients, at least
    "cpu_ms_per_request": 2.5,  # gateway + scheduler + worker + accountant, at most
}
HEADERS = {"content-type": "application/json"}
KEEPALIVE_S = 2.0
"""The client drops an idle connection before uvicorn's 5 s keep-alive does, so it never sends a
request on a connection the server is closing."""


def _body(i: int, stream: bool) -> bytes:
    payload: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"bench question {i}"}],
    }
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


class Side:
    """One end the bench calls (the gateway or the mock), through its own connection pool."""

    def __init__(self, base_url: str, connections: int) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Side:
        connector = aiohttp.TCPConnector(limit=self.connections, keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120)
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.session is not None:
            await self.session.close()

    async def complete(self, i: int) -> bool:
        """One JSON call: a 200 whose body is a ``chat.completion`` with choices."""
        assert self.session is not None
        async with self.session.post(self.url, data=_body(i, False), headers=HEADERS) as response:
            data = await response.read()
            status = response.status
        if status != 200:
            return False
        answer = orjson.loads(data)
        return answer.get("object") == "chat.completion" and bool(answer.get("choices"))

    async def stream(self, i: int, ttfc_ms: list[float]) -> bool:
        """One SSE call read to its end; on success its time to the first ``data:`` line goes
        to ``ttfc_ms``."""
        assert self.session is not None
        started = time.perf_counter()
        first: float | None = None
        done = False
        async with self.session.post(self.url, data=_body(i, True), headers=HEADERS) as response:
            if response.status != 200:
                await response.read()
                return False
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - started
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                elif done or orjson.loads(data).get("object") != "chat.completion.chunk":
                    return False  # an error event, or anything after [DONE]
        if first is None or not done:
            return False
        ttfc_ms.append(first * 1000)
        return True

    async def load(self, name: str, total: int, in_flight: int, max_seconds: float) -> Run:
        return await drive(
            name, self.complete, total=total, in_flight=in_flight, max_seconds=max_seconds
        )

    async def stream_load(self, name: str, total: int, max_seconds: float) -> Run:
        """One stream at a time; the run's latencies are the times to the first chunk, the
        whole streams' p50 goes to ``extra``."""
        ttfc: list[float] = []

        async def call(i: int) -> bool:
            return await self.stream(i, ttfc)

        run = await drive(name, call, total=total, in_flight=1, max_seconds=max_seconds)
        run.extra["stream_p50_ms"] = round(run.percentile(50), 2)
        run.latencies_ms = ttfc
        return run


async def scenario(bench: Bench, others_cpu: Callable[..., dict[str, float]]) -> list[Run]:
    """The pipeline and a gateway started fresh; both measurements; everything stopped."""
    s = bench.sizes
    bench.mock(latency_ms=0)
    procs = await bench.pipeline(concurrency=max(s.gateway_clients, 8))
    port = free_port()
    gateway = bench._start("gateway", "gateway", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_http, f"{url}/healthz", bench.start_timeout_s)
    mock = next(p for p in bench.procs.running if p.name == "mock-provider")
    try:
        async with (
            Side(url, s.gateway_clients) as via,
            Side(bench.mock_url, s.gateway_clients) as direct,
        ):
            runs = await _one_in_flight(bench, via, direct)
            runs += await _concurrent(bench, via, direct, [gateway, *procs], mock, others_cpu)
    finally:
        bench.stop([gateway, *procs])
    return runs


async def _one_in_flight(bench: Bench, via: Side, direct: Side) -> list[Run]:
    """Rounds alternating the direct call, the gateway, and the pipeline through the producer
    library (``SwitchyardClient``: what the gateway adds over the pipeline), then the same
    direct call and the gateway streaming."""
    s, cap = bench.sizes, bench.sizes.max_seconds
    await direct.load("warm-up", s.warmup_jobs, 1, cap)
    await via.load("warm-up", s.warmup_jobs, 1, cap)
    await via.stream_load("warm-up", max(1, s.warmup_jobs // 4), cap)
    per_round = max(1, s.gateway_latency_jobs // s.rounds)
    sides: dict[str, list[Run]] = {k: [] for k in ("direct", "gateway", "client", "dsse", "sse")}
    for _ in range(s.rounds):
        sides["direct"].append(await direct.load("direct", per_round, 1, cap))
        sides["gateway"].append(await via.load("gateway", per_round, 1, cap))
        sides["client"].append(await bench.switchyard_load("client", per_round, 1))
        sides["dsse"].append(await direct.stream_load("direct", per_round, cap))
        sides["sse"].append(await via.stream_load("gateway", per_round, cap))
    title = "gateway, one in flight:"
    direct_run = Run.merged(f"{title} direct to the mock, JSON", sides["direct"])
    run = Run.merged(f"{title} gateway, JSON", sides["gateway"])
    client = Run.merged(f"{title} SwitchyardClient, no gateway", sides["client"])
    direct_sse = Run.merged(f"{title} direct to the mock, SSE (first chunk)", sides["dsse"])
    sse = Run.merged(f"{title} gateway, SSE (first chunk)", sides["sse"])
    for merged, parts in ((direct_sse, sides["dsse"]), (sse, sides["sse"])):
        merged.extra["stream_p50_ms"] = [p.extra["stream_p50_ms"] for p in parts]
    for r in (run, client):
        r.extra["added_p50_ms"] = round(r.percentile(50) - direct_run.percentile(50), 2)
        r.extra["added_p99_ms"] = round(r.percentile(99) - direct_run.percentile(99), 2)
    run.extra["p50_minus_baseline_ms"] = round(run.percentile(50) - client.percentile(50), 2)
    run.extra["target_added_p50_ms"] = TARGETS["added_p50_ms"]
    # The SSE rows' latencies are times to the first chunk: their added_p50 is the added TTFC.
    sse.extra["added_ttfc_p50_ms"] = round(sse.percentile(50) - direct_sse.percentile(50), 2)
    sse.extra["added_ttfc_p99_ms"] = round(sse.percentile(99) - direct_sse.percentile(99), 2)
    sse.extra["added_p50_ms"] = sse.extra["added_ttfc_p50_ms"]
    sse.extra["added_p99_ms"] = sse.extra["added_ttfc_p99_ms"]
    return [direct_run, run, client, direct_sse, sse]


async def _concurrent(
    bench: Bench,
    via: Side,
    direct: Side,
    switchyard: list[Proc],
    mock: Proc,
    others_cpu: Callable[..., dict[str, float]],
) -> list[Run]:
    """Rounds alternating the direct call, the gateway and ``SwitchyardClient`` (the pipeline
    without the gateway) at ``gateway_clients`` in flight. A pipeline round's CPU is read after
    the accountant has drained the usage queue, so its batches count too."""
    s, clients = bench.sizes, bench.sizes.gateway_clients
    per_round = max(1, s.gateway_jobs // s.rounds)
    await via.load("warm-up", s.warmup_jobs, clients, s.max_seconds)
    await bench.drained(time.perf_counter())
    pipeline = [p for p in switchyard if p.name != "gateway"]
    loads: dict[str, tuple[Callable[[], Awaitable[Run]], list[Proc]]] = {
        "direct": (lambda: direct.load("direct", per_round, clients, s.max_seconds), [mock]),
        "gateway": (
            lambda: via.load("gateway", per_round, clients, s.max_seconds),
            [*switchyard, mock],
        ),
        "client": (lambda: bench.switchyard_load("client", per_round, clients), [*pipeline, mock]),
    }
    sides: dict[str, list[Run]] = {k: [] for k in loads}
    cpu: dict[str, dict[str, float]] = {k: {} for k in loads}
    busy = dict.fromkeys(loads, 0.0)
    for _ in range(s.rounds):
        for side, (load, procs) in loads.items():
            for proc in procs:
                proc.mark()
            others_before, busy_before = others_cpu(), machine_busy_s()
            sides[side].append(await load())
            if side != "direct":
                await bench.drained(time.perf_counter())
            busy[side] += machine_busy_s() - busy_before
            used = {p.name: p.cpu_since_mark() for p in procs}
            used.update(others_cpu(since=others_before))
            for name, seconds in used.items():
                cpu[side][name] = cpu[side].get(name, 0.0) + seconds
    title = f"gateway, {clients} clients:"
    merged = {
        "direct": Run.merged(f"{title} direct to the mock, JSON", sides["direct"]),
        "gateway": Run.merged(f"{title} gateway, JSON", sides["gateway"]),
        "client": Run.merged(f"{title} SwitchyardClient, no gateway", sides["client"]),
    }
    own = {p.name for p in switchyard}
    for side, run in merged.items():
        per_request = {
            name: round(seconds / max(run.jobs, 1) * 1000, 3) for name, seconds in cpu[side].items()
        }
        run.extra["cpu_ms_per_request"] = {k: v for k, v in per_request.items() if k in own}
        run.extra["others_cpu_ms_per_request"] = {
            k: v for k, v in per_request.items() if k not in own
        }
        run.extra["cpu_s"] = {k: round(v, 2) for k, v in cpu[side].items()}
        run.extra["machine_busy_cores"] = round(busy[side] / max(run.seconds, 1e-9), 2)
        if side != "direct":
            # cpu_s_per_job_ms, as the throughput rows name it: Switchyard's own processes.
            run.extra["cpu_s_per_job_ms"] = round(sum(run.extra["cpu_ms_per_request"].values()), 3)
            run.extra["vs_baseline"] = round(
                run.per_second / max(merged["direct"].per_second, 1e-9), 3
            )
            run.extra["round_per_second"] = [round(r.per_second, 1) for r in sides[side]]
    run = merged["gateway"]
    run.extra["vs_client_throughput"] = round(
        run.per_second / max(merged["client"].per_second, 1e-9), 3
    )
    run.extra["target_per_second"] = TARGETS["per_second"]
    run.extra["target_cpu_ms_per_request"] = TARGETS["cpu_ms_per_request"]
    return list(merged.values())


def _row(results: dict[str, Any], *parts: str) -> dict[str, Any]:
    return next(r for r in results["runs"] if all(part in r["name"] for part in parts))


def _cpu(run: dict[str, Any], key: str) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in run["extra"][key].items())


def targets_markdown(results: dict[str, Any]) -> str:
    """The gateway's figures beside its targets (empty when the run had no gateway rows)."""
    try:
        one = _row(results, "one in flight: gateway, JSON")
        client_one = _row(results, "one in flight: SwitchyardClient")
        sse = _row(results, "one in flight: gateway, SSE")
        load = _row(results, "clients: gateway")
        client = _row(results, "clients: SwitchyardClient")
        direct = _row(results, "clients: direct")
    except StopIteration:
        return ""
    lines = [
        "",
        "Gateway against its targets (printed, not asserted; SwitchyardClient is the same",
        "pipeline without the gateway, for what the gateway itself adds):",
        "",
        "| figure | gateway | target | SwitchyardClient |",
        "| --- | --- | --- | --- |",
        f"| one in flight, JSON: added p50 / p99 over the direct call "
        f"| {one['extra']['added_p50_ms']:+.2f} / {one['extra']['added_p99_ms']:+.2f} ms "
        f"| p50 ≤ +{TARGETS['added_p50_ms']:g} ms "
        f"| {client_one['extra']['added_p50_ms']:+.2f} / "
        f"{client_one['extra']['added_p99_ms']:+.2f} ms |",
        f"| one in flight, SSE: added time to first chunk p50 / p99 "
        f"| {sse['extra']['added_ttfc_p50_ms']:+.2f} / {sse['extra']['added_ttfc_p99_ms']:+.2f} ms "
        f"| | |",
        f"| {load['name'].split(':')[0]}: requests/s (direct to the mock: "
        f"{direct['per_second']:.1f}) | {load['per_second']:.1f} ({load['errors']} errors) "
        f"| ≥ {TARGETS['per_second']:g} | {client['per_second']:.1f} ({client['errors']} errors) |",
        f"| Switchyard CPU ms per request | {load['extra']['cpu_s_per_job_ms']:.3f} "
        f"({_cpu(load, 'cpu_ms_per_request')}) | ≤ {TARGETS['cpu_ms_per_request']:g} "
        f"| {client['extra']['cpu_s_per_job_ms']:.3f} ({_cpu(client, 'cpu_ms_per_request')}) |",
        f"| others' CPU ms per request | {_cpu(load, 'others_cpu_ms_per_request')} | "
        f"| {_cpu(client, 'others_cpu_ms_per_request')} |",
        f"| machine busy (cores of {results['machine']['cpus']}) "
        f"| {load['extra']['machine_busy_cores']} | | {client['extra']['machine_busy_cores']} |",
    ]
    return "\n".join(lines) + "\n"


def append_targets(results: dict[str, Any], out: Path) -> None:
    text = targets_markdown(results)
    if text:
        with (out / "bench.md").open("a") as md:
            md.write(text)

"""Every process's ``/metrics``, scraped by a real Prometheus (Debian's package) while a stack of
real processes (scheduler, two worker pools, accountant, gateway, webhook dispatcher) serves a
mix of jobs: each metric family is there, the ledger's figures (tokens, cost, jobs by status and
by key) are Postgres's, and every dashboard panel's query returns data."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient, make_job
from broker.core import names as metric_names
from broker.core.names import Names
from ops.grafana.check import check_dashboards
from schemas import JobResult, ReplyTo
from tests.conftest import (
    AMQP_URL,
    MockProvider,
    consumer_count,
    dead_provider,
    eventually,
    free_port,
    fresh_database,
    process_env,
    write_config,
)
from tests.prometheus_server import PrometheusServer
from tests.test_processes import Processes
from tests.webhook_receiver import Receiver, new_secret, receiving

KEY = "sk-metrics-test"
SECRET = new_secret()
FAMILIES = sorted(
    value
    for name, value in vars(metric_names).items()
    if name.startswith("METRIC_") and not name.endswith("_LABELS")
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(SECRET) as server:
        yield server


@pytest.fixture
async def ledger_url(names: Names) -> AsyncIterator[str]:
    """A database of this test's own: the scraped figures are compared with its whole ledger."""
    async with fresh_database(names.namespace.replace("-", "_").replace(".", "_")) as url:
        yield url


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(ledger_url.replace("+asyncpg", ""))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def stack(
    names: Names, ledger_url: str, tmp_path: Path, mock: MockProvider, receiver: Receiver
) -> Iterator[tuple[Processes, dict[str, int], int]]:
    """The processes, each with its own metrics port; yields them, the ports, the gateway's."""
    m = {"m": {"input": 1, "output": 2}}
    providers = [
        # Refuses every connection: retried once, failed over, then its circuit opens.
        dead_provider("dead", priority=0, max_attempts=2, circuit={"failures": 4, "open_s": 600}),
        {"id": "alpha", "priority": 1, "concurrency": 4, "models": m},
    ]
    key = {
        "id": "team-a",
        "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
        "budgets": {"usd_per_day": 0.01},
    }
    config = write_config(
        tmp_path / "p.yaml",
        mock,
        providers,
        default_policy="priority",
        routes={"summarize": ["m"]},
        keys=[key],
        alerts={"thresholds": [0.001], "webhook": receiver.url("/alerts")},
        webhooks={"secret": SECRET, "allow": ["127.0.0.1"], "retry_schedule_s": [0.2]},
    )
    env = process_env(names, ledger_url, config)
    procs = Processes(env, tmp_path)
    ports = {name: free_port() for name in ("scheduler", "accountant", "alpha", "dead")}
    ports |= {"gateway": free_port(), "webhooks": free_port()}
    gateway_port = free_port()
    try:
        for name in ("scheduler", "accountant"):
            procs.start(name, "--metrics-port", str(ports[name]))
        for provider in ("alpha", "dead"):
            procs.start("worker", "--provider", provider, "--metrics-port", str(ports[provider]))
        procs.start("gateway", "--port", str(gateway_port), "--metrics-port", str(ports["gateway"]))
        procs.start("webhooks", "--metrics-port", str(ports["webhooks"]))
        yield procs, ports, gateway_port
    finally:
        procs.stop_all()


async def _run_jobs(names: Names, gateway_port: int, receiver: Receiver, mock: MockProvider) -> int:
    """A mix of jobs; returns how many the ledger should record."""
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    small = {"max_tokens": 20}
    async with client:
        for i in range(4):  # the first two fail over from "dead", whose circuit then opens
            params = {**small, "user": "ann"}  # OpenAI's end user: the ledger's consumer
            await client.complete([_ask(i)], model="m", params=params, api_key=KEY)
        for i in range(3):
            await client.complete([_ask(10 + i)], task_type="summarize", params=small, api_key=KEY)
        refused = await client.complete([_ask(20)], model="nope", api_key=KEY)
        assert refused.error is not None
        job = make_job([_ask(30)], model="m", params=small)
        job = job.model_copy(update={"reply": ReplyTo(webhook=receiver.url("/h"))})
        hooked = await client.complete(job=job, api_key=KEY)
        assert hooked.error is None
        mock.configure(latency_ms=300)  # the repeat of a running job's key is parked
        first, repeat = await asyncio.gather(
            client.complete([_ask(40)], model="m", params=small, api_key=KEY, idempotency_key="k1"),
            client.complete([_ask(40)], model="m", params=small, api_key=KEY, idempotency_key="k1"),
        )
        assert first.error is None and repeat.error is None
        mock.configure(latency_ms=0)
        streamed = [r async for r in client.stream([_ask(45)], model="m", api_key=KEY)]
        ended = streamed[-1]
        assert isinstance(ended, JobResult) and ended.error is None
        call = ended.attempts[-1]  # its time to first chunk is what the TTFT histogram saw
        assert call.ttft_ms is not None and 0 <= call.ttft_ms <= call.duration_ms
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as http:
        body = {"model": "m", "messages": [_ask(50)], "stream": True, "max_tokens": 20}
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
        ) as response:
            assert response.status_code == 200
            assert (await response.aread()).rstrip().endswith(b"data: [DONE]")
    return 4 + 3 + 1 + 1 + 2 + 1 + 1


def _ask(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"metrics question {i}"}


async def test_prometheus_scrapes_every_process_and_the_figures_are_the_ledgers(
    amqp: AbstractRobustConnection,
    names: Names,
    ledger: asyncpg.Connection,
    mock: MockProvider,
    receiver: Receiver,
    stack: tuple[Processes, dict[str, int], int],
) -> None:
    _, ports, gateway_port = stack

    async def consuming() -> bool:
        queues = (names.jobs, names.usage, names.provider("alpha"), names.webhooks)
        return all([await consumer_count(amqp, q) >= 1 for q in queues])

    await eventually(consuming, 60, "every process to consume")
    targets = [f"127.0.0.1:{port}" for port in ports.values()]
    with PrometheusServer(targets) as prometheus:

        async def all_up() -> bool:
            return _value(prometheus, "sum(up)") == len(targets)

        await eventually(all_up, 60, "Prometheus to scrape every process")
        await _run_and_compare(names, gateway_port, receiver, mock, ledger, prometheus)

        async def every_panel_has_data() -> bool:  # a rate needs two scrapes of the last job
            return not check_dashboards(prometheus.url)

        with contextlib.suppress(TimeoutError):
            await eventually(every_panel_has_data, 15, "every panel's query to return data")
        problems = check_dashboards(prometheus.url)
        assert not problems, "\n".join(map(str, problems))


async def _run_and_compare(
    names: Names,
    gateway_port: int,
    receiver: Receiver,
    mock: MockProvider,
    pg: asyncpg.Connection,
    prometheus: PrometheusServer,
) -> None:
    expected = await _run_jobs(names, gateway_port, receiver, mock)

    async def recorded() -> bool:
        return bool(await pg.fetchval("SELECT count(*) FROM jobs") >= expected)

    async def delivered() -> bool:  # the job's result, and the budget's alert
        return bool(receiver.at("/h")) and bool(receiver.at("/alerts"))

    await eventually(recorded, 30, f"the accountant to record {expected} jobs")
    await eventually(delivered, 20, "the webhooks to be delivered")
    alert = receiver.at("/alerts")[0].payload
    assert alert["type"] == "quota.alert" and alert["data"]["label"].startswith("key team-a")
    ledger = await _ledger(pg)

    async def figures_match() -> bool:
        return _scraped_figures(prometheus) == ledger

    await eventually(figures_match, 40, "the scraped figures to equal the ledger's")

    def missing() -> list[str]:
        return [f for f in FAMILIES if not prometheus.query(f'{{__name__=~"{f}|{f}_bucket"}}')]

    async def every_family_scraped() -> bool:
        return not missing()

    try:  # each process's next scrape may be a second away
        await eventually(every_family_scraped, 20, "a series of every metric family")
    except TimeoutError:
        raise AssertionError(f"no series of {missing()}") from None
    assert _value(prometheus, 'sum(switchyard_failovers_total{provider="dead"})') >= 2
    assert _value(prometheus, 'max(switchyard_circuit_state{provider="dead"})') == 2
    assert _value(prometheus, 'sum(switchyard_jobs_parked_total{reason="repeat"})') >= 1
    delivered = 'sum(switchyard_webhook_deliveries_total{outcome="delivered"})'
    assert _value(prometheus, delivered) >= 2  # the job's result and the budget's alert

    async def queues_read() -> bool:  # RabbitMQ's API refreshes its figures every 5 s
        return _value(prometheus, 'max(switchyard_queue_consumers{queue="jobs"})') >= 1

    await eventually(queues_read, 20, "the jobs queue's consumer in the queue gauges")


async def _ledger(pg: asyncpg.Connection) -> dict[str, Any]:
    tokens = await pg.fetchrow(
        "SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(cost_usd) AS usd"
        " FROM usage"
    )
    by_key = await pg.fetch(
        "SELECT coalesce(key_id, '') AS key, sum(total_tokens) AS t FROM usage GROUP BY 1"
    )
    by_status = await pg.fetch(
        "SELECT CASE WHEN status = 'succeeded' THEN status ELSE coalesce(error_code, status) END"
        " AS s, count(*) AS n FROM jobs GROUP BY 1"
    )
    return {
        "prompt": int(tokens["p"]),
        "completion": int(tokens["c"]),
        "usd": round(float(tokens["usd"]), 9),
        "by_key": {r["key"]: int(r["t"]) for r in by_key},
        "by_status": {r["s"]: int(r["n"]) for r in by_status},
    }


def _scraped_figures(prometheus: PrometheusServer) -> dict[str, Any]:
    by_key = prometheus.query("sum by (key) (switchyard_tokens_total)")
    by_status = prometheus.query("sum by (status) (switchyard_jobs_finished_total)")
    return {
        "prompt": int(_value(prometheus, 'sum(switchyard_tokens_total{kind="prompt"})')),
        "completion": int(_value(prometheus, 'sum(switchyard_tokens_total{kind="completion"})')),
        "usd": round(_value(prometheus, "sum(switchyard_cost_usd_total)"), 9),
        "by_key": {s["metric"].get("key", ""): int(float(s["value"][1])) for s in by_key},
        "by_status": {s["metric"]["status"]: int(float(s["value"][1])) for s in by_status},
    }


def _value(prometheus: PrometheusServer, expr: str) -> float:
    found = prometheus.query(expr)
    return float(found[0]["value"][1]) if found else float("nan")

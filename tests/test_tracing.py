"""W3C trace context across every hop (``broker/core/tracing.py``): a caller's ``traceparent`` is
continued, not replaced; one job's trace id is in its result, on its webhook, and in the JSON log
lines of every process it passed; with an OTLP endpoint each hop is a span of that trace."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from broker.client import SwitchyardClient
from broker.core import tracing
from broker.core.config import Config
from broker.core.names import Names
from tests.conftest import (
    AMQP_URL,
    MockProvider,
    consumer_count,
    eventually,
    free_port,
    process_env,
    write_config,
)
from tests.test_processes import Processes
from tests.webhook_receiver import Receiver, new_secret, receiving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
KEY = "sk-tracing-test"
SECRET = new_secret()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_valid_traceparent_is_continued_and_a_bad_one_replaced() -> None:
    assert tracing.continued(CALLER) == CALLER
    for bad in (None, "", "01-" + CALLER[3:], CALLER.upper(), f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        made = tracing.continued(bad)
        assert tracing.valid(made) == made and made != bad


async def test_the_client_library_continues_a_callers_trace_into_the_result(
    names: Names, config: Config, pipeline: Any
) -> None:
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            continued = await client.complete(ask("a"), model="gpt-4o-mini", traceparent=CALLER)
            fresh = await client.complete(ask("b"), model="gpt-4o-mini")
    assert continued.trace_id == TRACE_ID
    assert fresh.trace_id is not None and fresh.trace_id != TRACE_ID


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(SECRET) as server:
        yield server


@pytest.fixture
def stack(
    names: Names, database_url: str, tmp_path: Path, mock: MockProvider
) -> Iterator[tuple[Processes, int]]:
    """Every process, logging at DEBUG as JSON to its own file; yields them and the gateway's
    port."""
    key = {"id": "tracer", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    webhooks = {"secret": SECRET, "allow": ["127.0.0.1"], "retry_schedule_s": [0.2]}
    config = write_config(
        tmp_path / "p.yaml", mock, [{"id": "mock"}], keys=[key], webhooks=webhooks
    )
    env = process_env(names, database_url, config)
    env.update(SWITCHYARD_LOG_LEVEL="DEBUG", SWITCHYARD_LOG_FORMAT="json")
    procs = Processes(env, tmp_path)
    port = free_port()
    try:
        for command in (["scheduler"], ["accountant"], ["worker", "--provider", "mock"]):
            procs.start(*command)
        procs.start("gateway", "--port", str(port))
        procs.start("webhooks")
        yield procs, port
    finally:
        procs.stop_all()


async def test_one_jobs_trace_id_is_in_every_process_log_its_result_and_its_webhook(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    receiver: Receiver,
    stack: tuple[Processes, int],
) -> None:
    procs, port = stack

    async def serving() -> bool:
        queues = (names.jobs, names.usage, names.provider("mock"), names.webhooks)
        if not all([await consumer_count(amqp, q) >= 1 for q in queues]):
            return False
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(serving, 60, "every process to serve")
    headers = {"authorization": f"Bearer {KEY}", "traceparent": CALLER}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        body = {"model": "gpt-4o-mini", "messages": ask("traced"), "webhook": receiver.url("/t")}
        created = await http.post("/v1/jobs", json=body, headers=headers)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        async def done() -> bool:
            job = (await http.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            return bool(job["status"] == "succeeded")

        await eventually(done, 30, "the job to succeed")
        job = (await http.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        chat = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": ask("sync")},
            headers=headers,
        )
    assert job["result"]["trace_id"] == TRACE_ID
    assert chat.status_code == 200 and tracing.trace_id_of(chat.headers["traceparent"]) == TRACE_ID

    async def delivered() -> bool:
        return bool(receiver.at("/t"))

    await eventually(delivered, 20, "the webhook")
    assert tracing.trace_id_of(receiver.at("/t")[0].headers["traceparent"]) == TRACE_ID

    async def every_process_logged_it() -> bool:
        return not _silent(procs, TRACE_ID)

    try:  # the accountant and the dispatcher write a moment after the answer
        await eventually(every_process_logged_it, 15, "a log line with the trace id from each")
    except TimeoutError:
        raise AssertionError(f"no line with the trace id in {_silent(procs, TRACE_ID)}") from None


def _silent(procs: Processes, trace_id: str) -> list[str]:
    """The processes whose logs hold no JSON line carrying ``trace_id``."""
    silent = []
    for log in sorted(procs.logs.glob("*.log")):
        lines = [_json(line) for line in log.read_text(errors="replace").splitlines()]
        if not any(line.get("trace_id") == trace_id for line in lines):
            silent.append(log.name)
    return silent


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that keeps every span it is sent."""

    spans: list[Any]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def collector() -> Iterator[tuple[str, list[Any]]]:
    spans: list[Any] = []
    handler = type("Collector", (_Collector,), {"spans": spans})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", spans
    finally:
        server.shutdown()
        thread.join(5)
        tracing.configure_tracing("off", None)


async def test_with_an_otlp_endpoint_each_hop_is_a_span_of_the_callers_trace(
    names: Names, config: Config, pipeline: Any, collector: tuple[str, list[Any]]
) -> None:
    url, spans = collector
    tracing.configure_tracing("switchyard-test", url)
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            result = await client.complete(ask("spans"), model="gpt-4o-mini", traceparent=CALLER)
    assert result.trace_id == TRACE_ID
    await asyncio.to_thread(tracing.flush_spans)
    ours = [s for s in spans if s.trace_id.hex() == TRACE_ID]
    by_name = {s.name: s for s in ours}
    scheduled, called = by_name[names.jobs], by_name[names.provider("mock")]
    assert scheduled.parent_span_id.hex() == CALLER.split("-")[2]  # the caller's span
    assert called.parent_span_id == scheduled.span_id  # the worker's hop is the scheduler's child

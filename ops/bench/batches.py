"""Stored batches under faults and at size (issue #17), with real processes: a gateway (its batch
runner), a scheduler, a worker and an accountant, each its own ``switchyard`` process, in a world
of their own (``chaos.Stage``: namespace, database, mock provider).

    python ops/bench/batches.py [--lines N] [--faults scheduler,worker,accountant,gateway,rabbitmq]

A file of N lines goes in through OpenAI's Files and Batch APIs (the ``openai`` SDK); each
fault lands in turn while lines are in flight (SIGKILL and a new process; RabbitMQ stopped and
started); the batch must end ``completed`` with every custom_id once across its output and error
files, and ``usage`` holding one row per call the mock served (``chaos.Books``). The test suite
runs it small (``tests/test_batch_faults.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import Books, Sizes, Stage
from faults import RABBITMQ, settle, stopped, unavailable
from procs import Proc, cli, free_port, wait_http

FAULTS = ("scheduler", "worker", "accountant", "gateway", "rabbitmq")


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

    def __init__(self, sizes: Sizes, out: Path, in_flight: int) -> None:
        super().__init__("batch", sizes, out)
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
        self.gateway = self.procs.start(f"gateway-{self._started}", *cli("gateway"))

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
                for queue in (n.results("batches"), n.results("gateway"), n.control, n.webhooks):
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--in-flight", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=Path("ops/bench/results"))
    args = parser.parse_args()
    faults = tuple(f for f in args.faults.split(",") if f)
    if "rabbitmq" in faults and (why := unavailable(RABBITMQ)):
        sys.exit(f"cannot run the rabbitmq fault: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = Sizes(latency_ms=35.0, concurrency=64, rabbitmq_down_s=5.0, answer_timeout_s=600.0)
    report = await run_batch_faults(args.lines, faults, args.out, sizes, args.in_flight)
    (args.out / "batch_faults.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    print(json.dumps(asdict(report), indent=2, default=str))
    sys.exit(1 if report.findings else 0)


if __name__ == "__main__":
    asyncio.run(main())

"""``switchyard submit FILE.jsonl``: push a batch of jobs through and collect the results.

Each line of the file is a job: ``{"messages": [...], "model": ..., "priority": ...,
"params": {...}, "metadata": {...}, "job_id": ...}`` (only ``messages`` is required).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import orjson
from pydantic import ValidationError

from broker.client.client import SwitchyardClient, make_job
from broker.core.errors import InvalidMessage
from schemas import CompletionJob, JobResult, JobStatus

__all__ = ["BatchSummary", "read_jobs", "run_batch"]


@dataclass
class BatchSummary:
    batch_id: str
    submitted: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def received(self) -> int:
        return sum(self.by_status.values())

    def add(self, result: JobResult) -> None:
        self.by_status[result.status.value] = self.by_status.get(result.status.value, 0) + 1
        if result.status is JobStatus.SUCCEEDED and result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
            self.cost_usd += result.cost_usd or 0


def read_jobs(path: Path, batch_id: str) -> list[CompletionJob]:
    """Parse every line first, so a bad line stops the batch before anything is sent."""
    jobs: list[CompletionJob] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
            metadata = {**data.pop("metadata", {}), "batch_id": batch_id}
            jobs.append(make_job(data.pop("messages"), metadata=metadata, **data))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidMessage(f"{path}:{number}: not a job ({type(exc).__name__})") from None
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            raise InvalidMessage(f"{path}:{number}: invalid fields: {fields}") from None
    return jobs


async def run_batch(
    client: SwitchyardClient,
    jobs: list[CompletionJob],
    out: Path,
    *,
    batch_id: str | None = None,
    timeout_s: float = 600.0,
    on_result: Callable[[JobResult], None] | None = None,
    api_key: str | None = None,
) -> BatchSummary:
    """Publish every job to a fresh durable results queue, write results to ``out`` as JSONL
    as they arrive, and stop when all are back or ``timeout_s`` passes."""
    summary = BatchSummary(batch_id=batch_id or str(uuid.uuid4()))
    queue = await client.open_results(summary.batch_id)
    wanted = {job.job_id for job in jobs}
    try:
        await asyncio.gather(
            *(client.submit(job, results_queue=queue, api_key=api_key) for job in jobs)
        )
        summary.submitted = len(jobs)
        with out.open("wb") as sink:

            async def collect() -> None:
                async for result in client.results(queue):
                    if result.job_id not in wanted:
                        continue
                    wanted.discard(result.job_id)
                    sink.write(result.model_dump_json().encode() + b"\n")
                    summary.add(result)
                    if on_result is not None:
                        on_result(result)
                    if not wanted:
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collect(), timeout_s)
    finally:
        await client.delete_results(queue)
    return summary

"""The priority a job travels at, in RabbitMQ's queues and the worker's call slots: a stored
batch's line at 0, below every other job, which goes at its own priority + 1 (1 to 10, the
queues' ``x-max-priority``). So a batch of 50,000 lines never delays interactive work, while the
job's ``priority`` field keeps its 0-9 meaning for producers and rules."""

from __future__ import annotations

from schemas import CompletionJob

__all__ = ["BATCH_PRIORITY", "queue_priority"]

BATCH_PRIORITY = 0


def queue_priority(job: CompletionJob) -> int:
    return BATCH_PRIORITY if job.batch is not None else job.priority + 1

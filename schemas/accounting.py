"""What the accountant consumes (``<ns>.usage``): one provider call's usage, a job's final
state, a call about to be made, or several of these in one message (docs/architecture.md,
"Message contracts")."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from schemas.jobs import ErrorCode, JobStatus, Timings, _Message

__all__ = ["AccountingBatch", "AccountingEvent", "CallStarted", "JobEvent", "UsageEvent"]


class UsageEvent(_Message):
    """Tokens consumed by one provider call; ``call_id`` is its identity."""

    kind: Literal["usage"] = "usage"
    call_id: str | None = Field(
        default=None,
        max_length=160,
        description="The call's id; an event from an older worker has none and is identified as"
        " ``<job_id>:<attempt>``.",
    )
    job_id: str
    attempt: int = Field(ge=1)
    provider: str
    model: str
    public_model: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    estimated: bool = False
    free: bool = Field(default=False, description="Free-tier call: costs nothing.")
    cost_usd: Decimal | None = Field(
        default=None,
        description="Priced once, by the worker at the call (the job's result carries the same"
        " figure); None when the config has no price for the model.",
    )
    price_version: str | None = Field(
        default=None, description="The digest of the config version that priced the call."
    )
    key_id: str | None = None
    task_type: str | None = Field(default=None, max_length=100)
    consumer: str | None = Field(
        default=None, max_length=256, description="OpenAI's ``user`` of the job, if any."
    )
    occurred_at: AwareDatetime


class JobEvent(_Message):
    """A job's final state, recorded in the ``jobs`` table (last writer wins per ``job_id``).

    It carries the usage of the attempts its last worker made, so finishing a job costs one
    accounting message; a ``UsageEvent`` travels alone only for attempts that did not finish it.
    """

    kind: Literal["job"] = "job"
    job_id: str
    status: JobStatus
    priority: int = 0
    public_model: str | None = None
    provider: str | None = None
    model: str | None = None
    error_code: ErrorCode | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings = Field(default_factory=Timings)
    batch_id: str | None = None
    key_id: str | None = None
    task_type: str | None = Field(default=None, max_length=100)
    trace_id: str | None = Field(default=None, max_length=32)
    submitted_at: AwareDatetime | None = None
    finished_at: AwareDatetime
    reservation_id: str | None = None
    reservation_calls: int | None = Field(
        default=None,
        ge=0,
        description="Provider calls made under reservation_id where that is not attempts (a "
        "failed-over job: its last provider's calls); 0 gives the reservation back whole.",
    )
    usage: list[UsageEvent] = Field(default_factory=list)
    call_ids: list[str] = Field(
        default_factory=list,
        description="The calls this event settles: every call made in this pass, billed or not.",
    )
    idempotency_key: str | None = Field(
        default=None,
        max_length=256,
        description="The job's; a job that ended without a provider's answer gives it back.",
    )


class CallStarted(_Message):
    """A provider call about to be made, recorded (confirmed) before its request leaves: if its
    worker dies, the accountant's sweeper settles it at ``reserved_*`` after ``settle_by``."""

    kind: Literal["call"] = "call"
    call_id: str = Field(min_length=1, max_length=160)
    job_id: str
    attempt: int = Field(ge=1)
    provider: str
    model: str
    public_model: str
    key_id: str | None = None
    reservation_id: str | None = None
    reserved_prompt_tokens: int = Field(ge=0)
    reserved_completion_tokens: int = Field(ge=0)
    reserved_cost_usd: Decimal | None = Field(
        default=None, description="What the reserved tokens cost; None with no price."
    )
    free: bool = Field(default=False, description="Made on the provider's free tier.")
    price_version: str | None = None
    task_type: str | None = Field(default=None, max_length=100)
    consumer: str | None = Field(default=None, max_length=256)
    started_at: AwareDatetime
    settle_by: AwareDatetime = Field(
        description="When the call, unsettled, is taken for lost with its worker."
    )


class AccountingBatch(_Message):
    """Several accounting events in one message: a process sends together the events (job ends,
    call starts) added while its previous accounting message awaited the broker's confirm."""

    kind: Literal["batch"] = "batch"
    events: list[Annotated[JobEvent | CallStarted, Field(discriminator="kind")]] = Field(
        min_length=1
    )


AccountingEvent = Annotated[
    UsageEvent | JobEvent | CallStarted | AccountingBatch, Field(discriminator="kind")
]

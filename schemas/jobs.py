"""Messages that travel between Switchyard's processes (docs/architecture.md, "Message contracts").

Every message is JSON with a ``schema_version``; a reader refuses a version it does not know.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    model_validator,
)

from schemas.chat import ChatCompletion, ChatCompletionChunk, ChatMessage, CompletionParams, Usage

__all__ = [
    "SCHEMA_VERSION",
    "Attempt",
    "BatchLine",
    "CachePolicy",
    "CompletionJob",
    "ErrorCode",
    "JobChunk",
    "JobError",
    "JobResult",
    "JobStatus",
    "ReplyTo",
    "Route",
    "Timings",
]

SCHEMA_VERSION: Literal[1] = 1


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION


class JobStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REROUTED = "rerouted"
    """Job events only, never a result: the job left a provider that failed it for the next
    candidate (failover); a later event ends it."""


class ErrorCode(StrEnum):
    """Typed error codes; each maps to one exception class in ``broker.core.errors``."""

    INVALID_MESSAGE = "invalid_message"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    MODEL_UNAVAILABLE = "model_unavailable"
    NO_PROVIDER_AVAILABLE = "no_provider_available"
    NO_CAPABLE_MODEL = "no_capable_model"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    CONTENT_FILTER = "content_filter"
    PROVIDER_PROTOCOL_ERROR = "provider_protocol_error"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal_error"


def _queue_name(name: str) -> str:
    # A longer name cannot be published to (an AMQP short string), so the job's result could
    # never be sent and its message would come back for ever, calling the provider each time.
    if len(name.encode()) > 255:
        raise ValueError("a queue name is at most 255 bytes")
    return name


class ReplyTo(BaseModel):
    """Where the result goes besides the AMQP ``reply_to`` property."""

    model_config = ConfigDict(extra="forbid")
    queue: Annotated[str, AfterValidator(_queue_name)] | None = None
    webhook: HttpUrl | None = None


class BatchLine(BaseModel):
    """The line of a stored batch (``broker.gateway.batches``) a job answers: it runs at batch
    priority, below every other job, in a fairness lane of its batch's own."""

    model_config = ConfigDict(extra="forbid")
    batch_id: str = Field(min_length=1, max_length=64)
    line: int = Field(ge=1, description="The line's number in the batch's input file, from 1.")


class CachePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["default", "bypass", "refresh"] = "default"
    ttl_s: int | None = Field(default=None, ge=0)


class Attempt(BaseModel):
    """One provider call made for a job."""

    model_config = ConfigDict(extra="forbid")
    number: int = Field(ge=1)
    provider: str
    model: str
    status: Literal["succeeded", "failed"]
    error_code: ErrorCode | None = None
    duration_ms: float = Field(ge=0)
    ttft_ms: float | None = Field(
        default=None, ge=0, description="A streamed call's time to its first chunk."
    )
    call_id: str | None = Field(
        default=None,
        description="The call's id in the ledger (usage.call_id); none for a call not made.",
    )


class CompletionJob(_Message):
    """A request for one chat completion, in OpenAI chat format."""

    job_id: str = Field(min_length=1, max_length=128)
    idempotency_key: str | None = Field(default=None, max_length=256)
    model: str | None = None
    task_type: str | None = Field(default=None, max_length=100)
    messages: list[ChatMessage] = Field(min_length=1)
    params: CompletionParams = Field(default_factory=CompletionParams)
    priority: int = Field(default=0, ge=0, le=9)
    deadline: AwareDatetime | None = None
    reply: ReplyTo = Field(default_factory=ReplyTo)
    metadata: dict[str, Any] = Field(default_factory=dict)
    cache: CachePolicy = Field(default_factory=CachePolicy)
    attempts: list[Attempt] = Field(default_factory=list)
    on_quota: Literal["wait", "reject"] = Field(
        default="reject",
        description="When no candidate has quota: park the job and retry until its deadline, "
        "or answer rate_limited with retry_after at once.",
    )
    submitted_at: AwareDatetime | None = Field(
        default=None, description="Set by the producer; the queued time is measured from it."
    )
    batch: BatchLine | None = Field(
        default=None, description="Set by the batch runner on a stored batch's line."
    )
    defer: bool = Field(
        default=False,
        description="May wait, parked, for a cheaper hour (a discount window or a free tier's "
        "reset) that opens early enough to finish before its deadline (which it needs).",
    )
    route: Route | None = Field(default=None, description="Set by the scheduler.")

    @model_validator(mode="after")
    def _deferred_by_a_deadline(self) -> CompletionJob:
        if self.defer and self.deadline is None:
            raise ValueError("defer: needs a deadline (the latest the job may wait until)")
        return self


class Route(BaseModel):
    """The scheduler's decision, carried on the job to the worker and into the result."""

    model_config = ConfigDict(extra="forbid")
    provider: str
    model: str = Field(description="The provider's own model name.")
    public_model: str = Field(description="The model name the producer asked for.")
    reason: str
    alternatives: list[str] = Field(default_factory=list)
    scheduled_at: AwareDatetime
    policy: str | None = None
    free: bool = Field(default=False, description="Served from the provider's free tier.")
    reservation_id: str | None = Field(
        default=None, description="The quota reservation the accountant reconciles."
    )
    quota_epoch: str | None = Field(
        default=None,
        description="The quota counters' epoch the reservation was made in: a worker that finds"
        " another sends the job back to be admitted again (Redis lost the reservation).",
    )
    key_id: str | None = None
    output_cap: int | None = Field(
        default=None,
        ge=1,
        description="The output cap the scheduler chose for a job that set none, under a token"
        " or USD limit: its reservation holds exactly this many output tokens, and the adapter"
        " sends it as the provider's cap. None: the job's own cap, or the model's, applies.",
    )
    est_prompt_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Prompt tokens estimated for each call (what its reservation holds).",
    )
    est_completion_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Output tokens reserved for each call: a call whose worker died is counted"
        " at these two.",
    )
    deferred_from: AwareDatetime | None = Field(
        default=None,
        description="The job waited for a cheaper hour (``defer``) since then: its result says "
        "what the wait saved against the same call's price at that moment.",
    )


class JobError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(
        description="Error family: invalid_request, provider_error, unavailable, internal."
    )
    code: ErrorCode
    message: str
    retry_after: float | None = Field(default=None, ge=0)
    provider: str | None = None


class Timings(BaseModel):
    """Milliseconds spent in each stage; ``None`` where the job never reached it."""

    model_config = ConfigDict(extra="forbid")
    queued_ms: float | None = None
    scheduled_ms: float | None = None
    provider_ms: float | None = None
    total_ms: float | None = None


class JobResult(_Message):
    job_id: str
    status: JobStatus
    response: ChatCompletion | None = None
    error: JobError | None = None
    provider: str | None = None
    model: str | None = None
    usage: Usage | None = None
    usage_estimated: bool = Field(
        default=False, description="The provider reported no usage; Switchyard counted it."
    )
    cost_usd: Decimal | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    cached: bool = False
    degraded: bool = False
    timings: Timings = Field(default_factory=Timings)
    metadata: dict[str, Any] = Field(default_factory=dict)
    replay_of: str | None = Field(
        default=None,
        description="A repeat of an idempotency key: the job whose result this is (no provider "
        "was called, and nothing charged, for this one).",
    )
    saved_usd: Decimal | None = Field(
        default=None,
        description="A deferred job's saving: its answer priced when it was deferred, less "
        "``cost_usd`` (what waiting for a cheaper hour saved).",
    )
    trace_id: str | None = Field(
        default=None,
        description="The job's W3C trace id (the caller's, continued, or one made at entry): "
        "the same in every process's log lines about it.",
    )

    @model_validator(mode="after")
    def _response_or_error(self) -> JobResult:
        if self.status is JobStatus.REROUTED:
            raise ValueError("a result ends a job: it is never rerouted")
        if self.status is JobStatus.SUCCEEDED and self.response is None:
            raise ValueError("a succeeded result carries a response")
        if self.status is not JobStatus.SUCCEEDED and self.error is None:
            raise ValueError(f"a {self.status.value} result carries an error")
        return self


class JobChunk(_Message):
    """One piece of a streamed answer, sent to ``reply_to`` before the final ``JobResult``.

    AMQP ``type`` is ``switchyard.chunk`` (results are ``switchyard.result``). ``sequence`` counts
    from 0 within an attempt; if a stream fails and is retried, the next attempt starts again at 0
    with a higher ``attempt``, and a reader drops what it held of the earlier attempt. The final
    ``JobResult`` is the authoritative answer.
    """

    job_id: str
    attempt: int = Field(ge=1)
    sequence: int = Field(ge=0)
    chunk: ChatCompletionChunk


CompletionJob.model_rebuild()

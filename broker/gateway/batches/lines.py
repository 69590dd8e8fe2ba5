"""A batch's lines: an input line (``{"custom_id", "method", "url", "body"}``) checked and made
a job, and a job's result made an output or error line (``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``), as OpenAI's Batch API has them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from broker.core.errors import status_of
from broker.gateway.chat import ChatRequest, job_from_request
from broker.gateway.errors import GatewayError, openai_error
from schemas import BatchLine, CompletionJob, JobResult, JobStatus, ReplyTo

__all__ = [
    "ENDPOINTS",
    "LineError",
    "LineRequest",
    "answered_line",
    "job_for_line",
    "parse_line",
    "unanswered_line",
]

ENDPOINTS = frozenset({"/v1/chat/completions"})
"""What a batch may call (the only endpoint the gateway serves)."""
CUSTOM_ID_MAX = 512


class LineRequest(ChatRequest):
    """A batch line's body: a chat completions request, run once, at batch priority, within
    the batch's window; ``webhook`` (Switchyard's own) gets its result, signed."""

    webhook: HttpUrl | None = None

    @classmethod
    def refused(cls) -> dict[str, str]:
        """Fields a request may set that a batch line may not, with why."""
        return {
            "stream": "a batch line does not stream",
            "priority": "a batch line runs at batch priority",
            "idempotency_key": "a batch line is answered once by its custom_id",
        }


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")
    custom_id: str = Field(min_length=1, max_length=CUSTOM_ID_MAX)
    method: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineError(Exception):
    """An input line that cannot be a job: the batch fails, naming it (OpenAI's ``errors``)."""

    code: str
    message: str
    line: int
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def parse_line(number: int, text: bytes, endpoint: str) -> tuple[str, LineRequest]:
    """The line's custom_id and request; ``LineError`` naming what is wrong."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise LineError("invalid_json_line", "not a JSON object", number) from None
    try:
        line = _Line.model_validate(data)
    except ValidationError as exc:
        raise _invalid("invalid_request", exc, number, "") from None
    if line.method != "POST":
        raise LineError("invalid_method", "method: only POST", number, "method")
    if line.url != endpoint:
        raise LineError("invalid_url", f"url: this batch's endpoint is {endpoint}", number, "url")
    for name, why in LineRequest.refused().items():
        if line.body.get(name) not in (None, False):
            raise LineError("invalid_request", f"body.{name}: {why}", number, f"body.{name}")
    try:
        request = LineRequest.model_validate(line.body)
    except ValidationError as exc:
        raise _invalid("invalid_request", exc, number, "body.") from None
    return line.custom_id, request


def _invalid(code: str, exc: ValidationError, number: int, prefix: str) -> LineError:
    error = exc.errors(include_input=False, include_url=False)[0]
    where = prefix + ".".join(str(p) for p in error["loc"])
    message = error["msg"] if error["type"] != "extra_forbidden" else "no such field"
    return LineError(code, f"{where or 'line'}: {message}", number, where or None)


def job_for_line(
    request: LineRequest,
    batch_id: str,
    number: int,
    expires_at: datetime,
    public_models: set[str],
    now: datetime,
    send_round: int = 1,
) -> CompletionJob:
    """The line's job: id ``<batch>-<line>-<round>``, new each time the batch's lines are sent
    again (``send_round``), and the idempotency key ``<batch>:<line>``, so a line sent again
    (its runner died before recording it sent) is a repeat, answered with the first one's
    result, not a second call (a job sent again under its own id would be a twin, and both may
    be called); it may wait for quota until the batch's window ends."""
    try:
        job = job_from_request(request, {}, public_models)
    except GatewayError as exc:
        raise LineError("invalid_request", exc.message, number, exc.param) from None
    deadline = min(request.deadline, expires_at) if request.deadline else expires_at
    return job.model_copy(
        update={
            "job_id": f"{batch_id}-{number}-{send_round}",
            "idempotency_key": f"{batch_id}:{number}",
            "batch": BatchLine(batch_id=batch_id, line=number),
            "defer": True,  # a batch may wait for a cheaper hour within its window
            "deadline": deadline,
            "on_quota": request.on_quota or "wait",
            "reply": ReplyTo(webhook=request.webhook),
            "submitted_at": now,
        }
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """A line's answer as stored: which file it goes to, its text, and what it cost."""

    line: int
    status: str
    in_error: bool
    output: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)


def _request_id(batch_id: str, line: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}-{line}".encode()).hexdigest()[:24]


def answered_line(batch_id: str, line: int, custom_id: str, result: JobResult) -> Answer:
    """The output line of a succeeded job, the error line of any other."""
    if result.status is JobStatus.SUCCEEDED and result.response is not None:
        status_code = 200
        body = result.response.model_dump(mode="json", exclude_none=True)
    else:
        assert result.error is not None
        status_code = status_of(result.error)
        error = result.error
        body = openai_error(status_code, error.message, error.code.value, provider=error.provider)
    text = {
        "id": _request_id(batch_id, line),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": result.job_id, "body": body},
        "error": None,
    }
    usage = result.usage
    return Answer(
        line,
        result.status.value,
        status_code != 200,
        orjson.dumps(text).decode(),
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        result.cost_usd or Decimal(0),
    )


def unanswered_line(batch_id: str, line: int, custom_id: str, code: str, message: str) -> Answer:
    """The error line of a line the batch ended without (expired, cancelled)."""
    text = {
        "id": _request_id(batch_id, line),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return Answer(line, code.removeprefix("batch_"), True, orjson.dumps(text).decode())

"""Bytes ⇄ messages. Each message is validated once, straight from its bytes."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from broker.core.errors import InvalidMessage, JobRejected, UnsupportedSchemaVersion
from schemas import SCHEMA_VERSION, AccountingEvent, CachePolicy, CompletionJob

__all__ = ["decode_accounting_event", "decode_job", "encode", "job_id_hint", "unbuilt_fields"]

_ACCOUNTING = TypeAdapter[AccountingEvent](AccountingEvent)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def _rejection(exc: ValidationError, what: str) -> JobRejected:
    """Name the fields and the reason, never the values (they may hold prompt text)."""
    errors = exc.errors(include_input=False, include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidMessage(f"{what} is not valid JSON")
    for e in errors:
        if e["loc"][:1] == ("schema_version",) and e["type"] == "literal_error":
            return UnsupportedSchemaVersion(
                f"unsupported schema_version; this Switchyard reads version {SCHEMA_VERSION}"
            )
    details = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in errors[:10]
    )
    return InvalidMessage(f"invalid {what}: {details}")


def decode_job(body: bytes) -> CompletionJob:
    """The job, or ``InvalidMessage`` naming what is wrong, or what it asks that is not built
    (no field is accepted and then ignored)."""
    try:
        job = CompletionJob.model_validate_json(body)
    except ValidationError as exc:
        raise _rejection(exc, "job") from None
    not_built = unbuilt_fields(job)
    if not_built:
        raise InvalidMessage(f"not supported yet: {', '.join(not_built)}")
    return job


def unbuilt_fields(job: CompletionJob) -> list[str]:
    """The fields a job sets that the pipeline does not act on yet (refused, by name)."""
    named = []
    if job.cache != CachePolicy():
        named.append("cache (the response cache is not built)")
    return named


def decode_accounting_event(body: bytes) -> AccountingEvent:
    try:
        return _ACCOUNTING.validate_json(body)
    except ValidationError as exc:
        raise _rejection(exc, "accounting event") from None


def job_id_hint(body: bytes, message_id: str | None) -> str | None:
    """Best guess of a bad message's job id, so its rejection can still be matched."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return message_id
    if isinstance(data, dict) and isinstance(data.get("job_id"), str):
        return str(data["job_id"])[:128]
    return message_id

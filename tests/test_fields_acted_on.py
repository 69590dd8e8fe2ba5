"""No field accepted and ignored: every field of ``CompletionJob`` and of the closed models it
nests (``ReplyTo``, ``CachePolicy``, ``BatchLine``, ``Route``, ``Attempt``) is either acted on,
with the test module that shows it, or refused when a producer sets it to anything but its
default. A field added to the schema without an entry here fails the first test.

Refused fields are sent for real, over AMQP through the pipeline: the job is answered
``rejected`` / ``invalid_message`` naming the field, and nothing is called. ``codec`` refusals
come from ``broker.core.codec.decode_job`` (``unbuilt_fields``), on every queue; ``scheduler``
refusals are of fields the pipeline itself sets (``route``, ``attempts``), which only a
producer's job on ``<ns>.jobs`` may not carry."""

from __future__ import annotations

import json
import re
import types
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from pydantic import BaseModel

from broker.client import SwitchyardClient, make_job
from broker.core.codec import decode_job, unbuilt_fields
from broker.core.config import load_config
from broker.core.errors import InvalidMessage
from broker.core.names import Names
from schemas import Attempt, BatchLine, CachePolicy, CompletionJob, ReplyTo, Route
from tests.conftest import AMQP_URL, REPO, MockProvider, eventually


@dataclass(frozen=True)
class Acted:
    """Acted on, as ``shown_in`` (a test module) shows; it names the field, or ``mentions``.
    For the fields under ``route`` and ``attempts`` (set by the pipeline, refused from a
    producer), acted on means read or reported by the part of the pipeline after the one that
    sets them."""

    shown_in: str
    mentions: str | None = None


@dataclass(frozen=True)
class Refused:
    """A producer's non-default ``value`` (a fragment of the job's JSON) is refused, the
    refusal naming the field. ``bug``: the refusal is wanted and not built (its test is a
    strict xfail with this reason)."""

    value: dict[str, Any]
    where: str = "codec"
    bug: str | None = None


@dataclass(frozen=True)
class Ignored:
    """Known to be accepted and ignored, a breach of the rule (``test_no_field_is_ignored``
    is a strict xfail while any is left): ``why``."""

    why: str


NOW = "2026-01-15T12:00:00+00:00"
A_ROUTE = {
    "provider": "mock",
    "model": "gpt-4o-mini",
    "public_model": "gpt-4o-mini",
    "reason": "the producer's own",
    "scheduled_at": NOW,
    "key_id": "someone-else",
}
AN_ATTEMPT = {
    "number": 1,
    "provider": "mock",
    "model": "gpt-4o-mini",
    "status": "failed",
    "error_code": "server_error",
    "duration_ms": 5,
    "call_id": "forged:1:0123456789ab",
}

FIELDS: dict[str, Acted | Refused | Ignored] = {
    "schema_version": Acted("test_bad_input"),  # another version: unsupported_schema_version
    "job_id": Acted("test_pipeline"),
    "idempotency_key": Acted("test_idempotency"),
    "model": Acted("test_routing"),
    "task_type": Acted("test_routing"),
    "messages": Acted("test_pipeline"),
    "params": Acted("test_openai_adapter"),
    "priority": Acted("test_pipeline"),
    "deadline": Acted("test_provider_failures"),
    "reply": Acted("test_fields_acted_on"),
    "reply.queue": Acted("test_fields_acted_on"),
    "reply.webhook": Acted("test_webhook_jobs", mentions="webhook"),
    "metadata": Acted("test_routing"),  # CEL rules read it; metadata.batch_id fills the row
    "cache": Refused({"cache": {"mode": "refresh", "ttl_s": 60}}),
    "cache.mode": Refused({"cache": {"mode": "bypass"}}),
    "cache.ttl_s": Refused({"cache": {"ttl_s": 60}}),
    "attempts": Refused({"attempts": [AN_ATTEMPT]}, where="scheduler"),
    "attempts.number": Acted("test_failover"),
    "attempts.provider": Acted("test_failover"),
    "attempts.model": Acted("test_failover"),
    "attempts.status": Acted("test_failover"),
    "attempts.error_code": Acted("test_failover"),
    "attempts.duration_ms": Acted("test_failover"),
    "attempts.ttft_ms": Acted("test_metrics"),  # switchyard_provider_ttft_seconds
    "attempts.call_id": Acted("test_processes"),
    "on_quota": Acted("test_admission"),
    "submitted_at": Acted("test_admission"),
    "batch": Acted("test_fields_acted_on"),  # batch priority, a lane per batch, the row's
    "batch.batch_id": Acted("test_fields_acted_on"),
    "batch.line": Acted("test_webhook_jobs", mentions="job_webhook_id"),  # a line's webhook id
    "defer": Acted("test_deferral"),
    "route": Refused({"route": A_ROUTE}, where="scheduler"),
    "route.provider": Acted("test_failover"),
    "route.model": Acted("test_routing"),
    "route.public_model": Acted("test_failover"),
    "route.reason": Acted("test_routing"),
    "route.alternatives": Acted("test_failover"),
    "route.scheduled_at": Acted("test_twins"),
    "route.policy": Acted("test_routing"),
    "route.free": Acted("test_routing"),
    "route.reservation_id": Acted("test_failover"),
    "route.quota_epoch": Acted("test_quota_rebuild"),
    "route.key_id": Acted("test_failover"),
    "route.output_cap": Acted("test_anthropic_adapter"),
    "route.est_prompt_tokens": Acted("test_routing"),
    "route.est_completion_tokens": Acted("test_routing"),
    "route.deferred_from": Acted("test_deferral", mentions="saved_usd"),
}

NESTED = {ReplyTo, CachePolicy, BatchLine, Route, Attempt}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X | None``, ``list[X]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType, list, tuple, dict, set):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def schema_fields(model: type[BaseModel] = CompletionJob, prefix: str = "") -> list[str]:
    """Every field's path; into each nested model that is closed (``extra="forbid"``): the
    chat types (messages, params) follow OpenAI and pass extra fields through."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        for inner in _models_in(info.annotation):
            if inner.model_config.get("extra") == "forbid":
                paths += schema_fields(inner, f"{prefix}{name}.")
    return paths


def job_json(**fragment: Any) -> dict[str, Any]:
    base = make_job([{"role": "user", "content": "a field test"}], model="gpt-4o-mini")
    return {**base.model_dump(mode="json", exclude_defaults=True), **fragment}


def refusals(*, through_the_pipeline: bool) -> list[Any]:
    """The refused entries; through the pipeline, one whose refusal is not built xfails."""
    return [
        pytest.param(
            path,
            entry,
            id=path,
            marks=[pytest.mark.xfail(strict=True, reason=entry.bug)]
            if entry.bug and through_the_pipeline
            else [],
        )
        for path, entry in FIELDS.items()
        if isinstance(entry, Refused)
    ]


def test_every_field_of_the_schema_has_an_entry() -> None:
    fields = schema_fields()
    missing = [f for f in fields if f not in FIELDS]
    assert not missing, f"fields with no entry (acted on, or refused?): {missing}"
    stale = [f for f in FIELDS if f not in fields]
    assert not stale, f"entries for fields the schema no longer has: {stale}"
    walked = {m for f in CompletionJob.model_fields.values() for m in _models_in(f.annotation)}
    assert walked >= NESTED


def test_each_acted_field_is_shown_by_a_test_module_that_names_it() -> None:
    for path, entry in FIELDS.items():
        if not isinstance(entry, Acted):
            continue
        module = REPO / "tests" / f"{entry.shown_in}.py"
        assert module.exists(), f"{path}: no module {module.name}"
        named = entry.mentions or path.rsplit(".", 1)[-1]
        assert re.search(rf"\b{re.escape(named)}\b", module.read_text()), (path, module.name)


@pytest.mark.parametrize(("path", "entry"), refusals(through_the_pipeline=False))
def test_the_codec_refuses_exactly_the_codec_refused_fields(path: str, entry: Refused) -> None:
    body = json.dumps(job_json(**entry.value)).encode()
    top = path.split(".")[0]
    if entry.where == "codec":
        with pytest.raises(InvalidMessage, match=rf"\b{top}\b") as refused:
            decode_job(body)
        assert "not supported yet" in refused.value.message
        named = unbuilt_fields(CompletionJob.model_validate_json(body))
        assert [n.split(" ")[0] for n in named] == [top]
    else:  # decode_job reads every queue's jobs: this field is refused on <ns>.jobs only
        assert decode_job(body).model_fields_set >= {top}


def test_the_codec_refuses_nothing_acted_on() -> None:
    """A job setting each producer field the table calls acted on (``defer`` among them, now
    that deferral is built) passes ``decode_job``; ``unbuilt_fields`` names only refused ones."""
    acted = job_json(
        idempotency_key="k-1",
        task_type="summarize",
        params={"max_tokens": 5, "temperature": 0.5, "seed": 7},
        priority=5,
        deadline=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        reply={"queue": "a-queue", "webhook": "https://example.com/hook"},
        metadata={"team": "search", "batch_id": "b-1"},
        on_quota="wait",
        submitted_at=NOW,
        batch={"batch_id": "batch_1", "line": 3},
        defer=True,
    )
    job = decode_job(json.dumps(acted).encode())
    assert unbuilt_fields(job) == []
    refused = {p.split(".")[0] for p, e in FIELDS.items() if isinstance(e, Refused)}
    acted_top = {p for p, e in FIELDS.items() if isinstance(e, Acted) and "." not in p}
    assert job.model_fields_set - {"schema_version", "model", "messages", "job_id"} <= acted_top
    assert not refused & acted_top


@pytest.mark.parametrize(("path", "entry"), refusals(through_the_pipeline=True))
async def test_a_refused_field_is_rejected_through_the_pipeline_by_name(
    path: str,
    entry: Refused,
    names: Names,
    config_file: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    job = CompletionJob.model_validate(job_json(**entry.value))
    top = path.split(".")[0]
    async with (
        pipeline(load_config(config_file)),
        await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace) as client,
    ):
        result = await client.complete(job=job, timeout_s=20)
    assert result.job_id == job.job_id
    assert result.status.value == "rejected", (result.status, result.attempts)
    assert result.error is not None and result.error.code.value == "invalid_message"
    assert re.search(rf"\b{top}\b", result.error.message), result.error.message
    assert result.response is None and result.attempts == []
    assert mock.stats()["calls"] == 0


async def test_reply_queue_and_batch_are_acted_on(
    amqp: AbstractRobustConnection,
    names: Names,
    config_file: Path,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
) -> None:
    """Shown here, as no other module does: ``reply.queue`` is where the result goes for a
    producer that sets no ``reply_to``; ``batch.batch_id`` is the job's batch in its row."""
    channel = await amqp.channel()
    replies = await channel.declare_queue(f"{names.namespace}.field-replies", exclusive=True)
    job_id = f"fields-{uuid.uuid4()}"
    body = job_json(
        job_id=job_id,
        reply={"queue": replies.name},
        batch={"batch_id": "batch_fields", "line": 1},
    )
    async with pipeline(load_config(config_file)):
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), message_id=job_id),  # no reply_to
            routing_key=names.jobs,
        )
        message = None
        async with replies.iterator(timeout=20) as messages:
            async for message in messages:
                await message.ack()
                break
        assert message is not None
        result = json.loads(message.body)
        assert (result["job_id"], result["status"]) == (job_id, "succeeded")

        async def recorded() -> bool:
            row = await pg.fetchval("SELECT batch_id FROM jobs WHERE job_id = $1", job_id)
            return row is not None

        await eventually(recorded, 10, "the job's row")
    assert await pg.fetchval("SELECT batch_id FROM jobs WHERE job_id = $1", job_id) == (
        "batch_fields"
    )
    await channel.close()


def test_no_field_is_ignored() -> None:
    ignored = {p: e.why for p, e in FIELDS.items() if isinstance(e, Ignored)}
    assert ignored == {}, ignored

"""The AMQP interface as an AsyncAPI 3.0 document, generated from the message models in
``schemas/`` and the names in ``Names``, so it cannot drift from what the processes accept.
The gateway serves it at ``/asyncapi.json``; ``switchyard asyncapi`` writes it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from broker.core.names import (
    DIRECT_REPLY_TO,
    HEADER_KEY,
    HEADER_TRACEPARENT,
    TYPE_CHUNK,
    TYPE_RESULT,
    TYPE_STANDING,
    Names,
)
from schemas import CompletionJob, JobChunk, JobQuery, JobResult, JobStandingReply

__all__ = ["asyncapi_document"]

_MESSAGES: dict[str, tuple[type[BaseModel], str | None, str]] = {
    "CompletionJob": (CompletionJob, None, "A chat completion job (OpenAI's request shape)."),
    "JobResult": (JobResult, TYPE_RESULT, "A job's end: its answer or its typed error."),
    "JobChunk": (JobChunk, TYPE_CHUNK, "One piece of a streamed answer, before the result."),
    "JobQuery": (JobQuery, None, "Where a job stands, or cancel it before its call."),
    "JobStandingReply": (JobStandingReply, TYPE_STANDING, "The answer to a JobQuery."),
}


def asyncapi_document(names: Names, server: str = "127.0.0.1:5672") -> dict[str, Any]:
    payloads, defs = models_json_schema(
        [(model, "validation") for model, _, _ in _MESSAGES.values()],
        ref_template="#/components/schemas/{model}",
    )
    schemas = dict(defs.get("$defs", {}))
    messages = {}
    for name, (model, amqp_type, summary) in _MESSAGES.items():
        messages[name] = {
            "name": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": payloads[(model, "validation")],
            "headers": _headers(name),
            "correlationId": {"location": "$message.header#/correlation_id"},
            "bindings": {"amqp": {"messageType": amqp_type} if amqp_type else {}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Switchyard AMQP interface",
            "version": "1",
            "description": "Publish jobs to the jobs queue with reply_to (a results queue, or "
            "direct reply-to); results and chunks come back there. Properties: message_id = "
            "job id, correlation_id, priority 0-9, delivery_mode 2 to survive a broker restart.",
        },
        "servers": {"rabbitmq": {"host": server, "protocol": "amqp", "protocolVersion": "0.9.1"}},
        "channels": _channels(names),
        "operations": {
            "sendJob": _operation("send", "jobs", ["CompletionJob"], "replies"),
            "receiveReplies": _operation("receive", "replies", ["JobChunk", "JobResult"]),
            "receiveResults": _operation("receive", "results", ["JobResult"]),
            "askAboutJob": _operation("send", "control", ["JobQuery"], "replies"),
            "receiveStanding": _operation("receive", "replies", ["JobStandingReply"]),
        },
        "components": {"messages": messages, "schemas": schemas},
    }


def _channels(names: Names) -> dict[str, Any]:
    def queue(address: str, summary: str, messages: list[str], durable: bool = True) -> Any:
        return {
            "address": address,
            "summary": summary,
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in messages},
            "bindings": {"amqp": {"is": "queue", "queue": {"name": address, "durable": durable}}},
        }

    return {
        "jobs": queue(
            names.jobs, "Jobs in: priority queue (x-max-priority 10).", ["CompletionJob"]
        ),
        "results": queue(
            names.results("{name}"),
            "A producer's durable results queue (client.open_results).",
            ["JobResult"],
        ),
        "replies": queue(
            DIRECT_REPLY_TO,
            "RabbitMQ's direct reply-to: RPC answers, at most once.",
            ["JobChunk", "JobResult", "JobStandingReply"],
            durable=False,
        ),
        "control": queue(
            names.control, "Questions about jobs, answered by a scheduler.", ["JobQuery"]
        ),
    }


def _operation(
    action: str, channel: str, messages: list[str], reply: str | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
    }
    if reply is not None:
        operation["reply"] = {
            "channel": {"$ref": f"#/channels/{reply}"},
            "address": {"location": "$message.header#/reply_to"},
        }
    return operation


def _headers(message: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        HEADER_TRACEPARENT: {"type": "string", "description": "W3C trace context, passed on."}
    }
    if message in ("CompletionJob", "JobQuery"):
        properties[HEADER_KEY] = {
            "type": "string",
            "description": "The virtual key (required when the deployment has keys).",
        }
    return {"type": "object", "properties": properties}

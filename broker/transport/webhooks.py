"""Webhook events on ``<ns>.webhooks``: publishing one (a job's result, a batch's end) for the
webhook dispatcher, and reading one back.

The ``webhook_id`` of an event is derived from what it reports, so a job's twin (run again after
a process died) or a result published twice gives the same id, and the dispatcher records and
sends it once; a receiver sees the same ``webhook-id`` on every retry.
"""

from __future__ import annotations

import hashlib

from pydantic import ValidationError

from broker.core.codec import encode
from broker.core.errors import InvalidMessage
from broker.core.names import Names
from broker.transport.amqp import Publisher
from schemas import WebhookRequest

__all__ = [
    "alert_webhook_id",
    "batch_webhook_id",
    "decode_webhook",
    "job_webhook_id",
    "publish_webhook",
]


def _webhook_id(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]
    return f"msg_{digest}"


def job_webhook_id(job_id: str) -> str:
    """The ``webhook-id`` of a job's result: the same for every copy of that result."""
    return _webhook_id("job", job_id)


def batch_webhook_id(batch_id: str, status: str) -> str:
    """The ``webhook-id`` of a batch reaching ``status`` (completed, failed, ...)."""
    return _webhook_id("batch", batch_id, status)


def alert_webhook_id(label: str, threshold: int, at: str) -> str:
    """The ``webhook-id`` of a limit or budget crossing ``threshold`` percent at ``at``."""
    return _webhook_id("alert", label, str(threshold), at)


async def publish_webhook(publisher: Publisher, names: Names, request: WebhookRequest) -> None:
    """Hand an event to the webhook dispatchers: persistent, and confirmed before returning."""
    await publisher.publish(names.webhooks, encode(request), message_id=request.webhook_id)


def decode_webhook(body: bytes) -> WebhookRequest:
    """The event, or ``InvalidMessage`` naming the fields at fault (never their values, which
    may hold prompt text)."""
    try:
        return WebhookRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in errors[:10]
        )
        raise InvalidMessage(f"invalid webhook event: {details}") from None

"""What the webhook dispatcher consumes (``<ns>.webhooks``): one event to POST to one URL.

The dispatcher (``broker.webhooks``) signs and sends ``{"type", "timestamp", "data"}`` (the
Standard Webhooks payload shape) with ``webhook-id`` = ``webhook_id``, the same on every retry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, HttpUrl

__all__ = ["WebhookRequest"]


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1
    webhook_id: str = Field(
        min_length=1,
        max_length=128,
        description="The delivery's identity (``webhook-id``): a receiver drops repeats by it.",
    )
    url: HttpUrl
    type: str = Field(
        min_length=1,
        max_length=64,
        description="The event: ``job.<status>`` with a JobResult as data, ``batch.<status>`` "
        "(completed, failed, expired, cancelled) with the batch object.",
    )
    data: dict[str, Any]
    owner: str | None = Field(
        default=None, description="The virtual key's id whose job or batch this is."
    )
    occurred_at: AwareDatetime
    traceparent: str | None = Field(
        default=None,
        max_length=55,
        description="The W3C trace context of the job or batch: sent as the POST's header.",
    )

"""The config's ``webhooks`` section (how results are signed, retried, and which addresses they
may go to), and the Standard Webhooks signature itself: one place, so the dispatcher, the bench
and the tests sign alike.

A secret is ``whsec_`` and base64, as the Standard Webhooks spec gives it; several (a list)
sign every delivery during a rotation, so a receiver holding either one verifies it. Write
``secret: ${NAME}`` to keep it out of the file (``broker.core.config`` expands it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
from pydantic import AfterValidator, BeforeValidator, Field

from broker.core.strict import StrictModel
from schemas import WebhookRequest

__all__ = [
    "SVIX_SCHEDULE_S",
    "WebhookEndpoint",
    "WebhooksConfig",
    "secret_key",
    "sign",
    "signed_headers",
    "webhook_body",
]

SVIX_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""The waits before each retry (after the first try): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_<base64>`` secret stands for."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def sign(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one
    per secret, space-separated (a receiver holding any one of them verifies it)."""
    signed = b"%s.%d." % (webhook_id.encode(), timestamp) + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(secret_key(s), signed, hashlib.sha256)).decode()
        for s in secrets
    )


def signed_headers(
    secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (the timestamp is the attempt's own)."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, webhook_id, timestamp, body),
    }


def webhook_body(request: WebhookRequest) -> bytes:
    """``{"type", "timestamp", "data"}`` (the Standard Webhooks payload shape), built once when
    the delivery is recorded: every retry sends these bytes."""
    occurred = request.occurred_at.astimezone(UTC)
    payload = {"type": request.type, "timestamp": occurred, "data": request.data}
    return orjson.dumps(payload, option=orjson.OPT_UTC_Z)


def _valid_secret(secret: str) -> str:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret is whsec_ and base64 (Standard Webhooks)")
    try:
        key = secret_key(secret)
    except binascii.Error:
        raise ValueError("a webhook secret's part after whsec_ is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret is 24 to 64 bytes (Standard Webhooks)")
    return secret


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Secret = Annotated[str, AfterValidator(_valid_secret)]
Secrets = Annotated[list[Secret], BeforeValidator(_one_or_many)]


class WebhookEndpoint(StrictModel):
    """Secrets of their own for the URLs that begin with ``url``."""

    url: str = Field(min_length=1, description="A URL prefix: https://hooks.example.com/")
    secret: Secrets = Field(min_length=1, repr=False)


class WebhooksConfig(StrictModel):
    secret: Secrets = Field(
        default_factory=list,
        repr=False,
        description="One whsec_ secret, or several during a rotation (each signs). None set: "
        "a job naming a webhook is refused.",
    )
    endpoints: list[WebhookEndpoint] = Field(default_factory=list)
    allow: list[str] = Field(
        default_factory=list,
        description="Hosts and CIDRs a webhook may reach although loopback, private, link-local "
        "or a metadata address (all refused otherwise).",
    )
    retry_schedule_s: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: list(SVIX_SCHEDULE_S),
        description="The wait before each retry; after the last, the delivery is dead-lettered.",
    )
    jitter: float = Field(
        default=0.2, ge=0, le=1, description="Each wait is varied by up to this fraction."
    )
    timeout_s: float = Field(default=10.0, gt=0, description="One attempt's whole time.")
    concurrency: int = Field(default=64, ge=1, description="Attempts in flight per dispatcher.")

    @property
    def tries(self) -> int:
        """Attempts in one series: the first, then one after each wait of the schedule."""
        return 1 + len(self.retry_schedule_s)

    def retry_wait_s(self, tries: int, spread: float) -> float | None:
        """The wait after the ``tries``-th failed attempt of a series, varied by ``spread``
        (-1 to 1) times ``jitter``; None when it was the last."""
        if tries >= self.tries:
            return None
        return self.retry_schedule_s[tries - 1] * (1 + self.jitter * spread)

    def secrets_for(self, url: str) -> list[str]:
        """The secrets that sign a delivery to ``url``: the longest matching endpoint's, else
        the section's."""
        matching = [e for e in self.endpoints if _under(url, e.url)]
        if matching:
            return list(max(matching, key=lambda e: len(e.url)).secret)
        return list(self.secret)


def _under(url: str, prefix: str) -> bool:
    """Whether ``url`` is at or below ``prefix``: the same scheme, host and port, and a path
    that continues the prefix's at a ``/`` (a plain string prefix would let
    ``https://hooks.acme.com.evil.net`` or ``https://hooks.acme.com@evil.net`` take Acme's
    secret)."""
    at, base = urlsplit(url), urlsplit(prefix)
    try:
        same = (at.scheme, at.hostname, at.port) == (base.scheme, base.hostname, base.port)
    except ValueError:
        return False
    if not same or at.username is not None or at.password is not None:
        return False
    root = base.path.rstrip("/")
    return at.path == root or at.path.startswith(root + "/")

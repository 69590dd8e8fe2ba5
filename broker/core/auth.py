"""Who sent a job: its virtual key, from the header the producer set (the scheduler's first
pass only; past it the route carries the key's id, never the secret)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.core.config import Config
from broker.core.errors import Unauthorized
from broker.core.limits import KeyConfig
from broker.core.names import HEADER_KEY

__all__ = ["authenticate"]


def authenticate(headers: Mapping[str, Any] | None, config: Config) -> KeyConfig | None:
    """With keys configured, every job must carry a known one; without, jobs are anonymous."""
    if not config.keys:
        return None
    secret = (headers or {}).get(HEADER_KEY)
    if isinstance(secret, bytes):
        secret = secret.decode(errors="replace")
    key = config.key_for_secret(secret) if isinstance(secret, str) else None
    if key is None:
        raise Unauthorized(
            f"a known virtual key is required in the {HEADER_KEY} header"
            + ("" if secret else " (none was given)")
        )
    return key

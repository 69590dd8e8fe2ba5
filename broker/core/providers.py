"""A provider as the providers file describes it: its API, its models and their prices, its
limits and its circuit breaker; ``broker.core.config`` re-exports all."""

from __future__ import annotations

import os
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from zoneinfo import ZoneInfo

from pydantic import Field, HttpUrl

from broker.core.limits import Discount, FreeTier
from broker.core.strict import StrictModel

__all__ = ["Capabilities", "CircuitConfig", "ModelSpec", "ProviderConfig", "ProviderType"]


class ProviderType(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    OPENAI_COMPATIBLE = "openai_compatible"
    MOCK = "mock"


class Capabilities(StrictModel):
    """What a model takes. Routing drops a model that lacks what a job needs (a stream, tools,
    JSON output, images), naming why; the defaults are what every adapter can translate."""

    streaming: bool = True
    tools: bool = True
    json_mode: bool = True
    vision: bool = False


class ModelSpec(StrictModel):
    """One model of a provider: prices in USD per million tokens, and its defaults."""

    input: Decimal = Field(ge=0, description="USD per million prompt tokens.")
    output: Decimal = Field(ge=0, description="USD per million completion tokens.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Output cap sent when a job sets none (Anthropic requires one).",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute, this model.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute, this model.")
    discounts: list[Discount] = Field(
        default_factory=list, description="Off-peak windows; the lowest multiplier applies."
    )
    context_window: int | None = Field(
        default=None,
        ge=1,
        description="Prompt and output tokens the model takes; a longer job is not sent to it.",
    )
    capabilities: Capabilities = Field(default_factory=Capabilities)

    def discount_at(self, at: datetime, default_zone: ZoneInfo) -> Discount | None:
        """The window containing ``at`` with the lowest multiplier (the first among equals)."""
        active = [d for d in self.discounts if d.contains(at, default_zone)]
        return min(active, key=lambda d: d.multiplier) if active else None

    def multiplier_at(self, at: datetime, default_zone: ZoneInfo) -> Decimal:
        """The price factor in force at ``at``: the window's, 1 outside every window."""
        discount = self.discount_at(at, default_zone)
        return discount.multiplier if discount is not None else Decimal(1)


class CircuitConfig(StrictModel):
    """When a provider's circuit breaker opens (``broker.state.circuits``)."""

    failures: int = Field(
        default=5, ge=1, description="Failed calls in a row (timeouts, 5xx) that open it."
    )
    open_s: float = Field(
        default=30.0, gt=0, description="How long it stays open before a call may try again."
    )


class ProviderConfig(StrictModel):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    type: ProviderType
    base_url: HttpUrl
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the provider key."
    )
    headers: dict[str, str] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(min_length=1)
    concurrency: int = Field(default=8, ge=1, le=10_000)
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    global_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight across all worker processes (Redis leases); "
        "`concurrency` is each process's own cap.",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute, all models.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute, all models.")
    weight: float = Field(default=1.0, gt=0, description="Share of jobs under `weighted`.")
    priority: int = Field(default=0, description="Order under `priority`: lower is tried first.")
    tags: list[str] = Field(default_factory=list)
    task_types: list[str] = Field(
        default_factory=list,
        description="If set, jobs routed by task type reach this provider only for these types.",
    )
    free_tier: FreeTier | None = None
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)

    def api_key(self) -> str | None:
        """The key from the environment, read at call time so a rotated key is picked up."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

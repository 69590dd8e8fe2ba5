"""Knobs of the mock provider: latency, injected faults, auth and the accepted models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MockSettings"]


class MockSettings(BaseModel):
    """Immutable; a runtime change (``PUT /_mock/config``) builds a new instance.

    Faults are drawn from one uniform number per call: below ``rate_limit_rate`` is a 429, the next
    ``error_rate`` of the range is a 500, so the two rates together may not exceed 1.
    """

    # extra="forbid" so a typo in a runtime PUT is a 400, not a silently ignored knob.
    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(default=0, ge=0)
    jitter_ms: float = Field(default=0, ge=0)
    error_rate: float = Field(default=0, ge=0, le=1)
    rate_limit_rate: float = Field(default=0, ge=0, le=1)
    retry_after_s: float = Field(default=1, ge=0)
    api_key: str | None = None
    models: list[str] = Field(default_factory=list)
    seed: int = 0

    @model_validator(mode="after")
    def _rates_fit(self) -> MockSettings:
        if self.error_rate + self.rate_limit_rate > 1:
            raise ValueError("error_rate + rate_limit_rate must not exceed 1")
        return self

    def public(self) -> dict[str, object]:
        """The settings as JSON, with the API key redacted."""
        data = self.model_dump(mode="json")
        if self.api_key is not None:
            data["api_key"] = "***"
        return data

"""Asking about a job over AMQP (``<ns>.control``, answered by a scheduler on the asker's
reply queue): where a tracked job stands, or cancelling it before its call."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import JobError

__all__ = ["JobQuery", "JobStandingReply"]


class JobQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    op: Literal["standing", "cancel"]
    job_id: str = Field(min_length=1, max_length=128)


class JobStandingReply(BaseModel):
    """Where the job stands (after a cancel: ``cancelled``, or ``running``/``done`` if its call
    had started). ``scheduling``: no scheduler has placed it yet (or it is not tracked: only
    persistent jobs are); ``not_found``: another caller's."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    job_id: str
    state: Literal["scheduling", "queued", "running", "done", "cancelled", "not_found"]
    provider: str | None = None
    model: str | None = None
    priority: int | None = None
    position: int | None = Field(default=None, description="Tracked jobs ahead of it.")
    eta_s: float | None = Field(default=None, description="Seconds until its call starts.")
    est_cost_usd: str | None = None
    error: JobError | None = Field(
        default=None, description="Why it could not be answered (unauthorized, unavailable)."
    )

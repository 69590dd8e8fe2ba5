"""Process settings, read once from the environment (``SWITCHYARD_*``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CALL_SETTLE_MARGIN_S", "Settings", "get_settings"]

CALL_SETTLE_MARGIN_S = 60.0
"""How long past its provider's timeout a call may stay unsettled before the accountant's
sweeper takes its worker for dead and counts the call at its reservation (``CallStarted``)."""


class Settings(BaseSettings):
    """Where the services are and which config file to serve.

    ``namespace`` prefixes every queue, exchange and Redis key, so several deployments (or test
    sessions) can share one RabbitMQ and one Redis.
    """

    model_config = SettingsConfigDict(env_prefix="SWITCHYARD_", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    config: Path = Path("ops/config.example.yaml")
    namespace: str = Field(default="switchyard", pattern=r"^[A-Za-z0-9_.-]+$")
    log_level: str = "INFO"
    # Server processes' log lines: JSON objects (with the trace id), or plain text.
    log_format: Literal["json", "text"] = "json"
    # OTLP over HTTP (e.g. http://collector:4318): a span per hop of every job; unset: none.
    otlp_endpoint: str | None = None
    # The faster pair by ops/bench's measure (docs/architecture.md).
    http_transport: Literal["httpx", "aiohttp"] = "aiohttp"
    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    # Server processes install ``broker.transport.fastpath`` unless this is off; the client
    # library never reads it (a producer calls ``fastpath.install()`` itself).
    amqp_fast_path: bool = True
    call_settle_margin_s: float = Field(default=CALL_SETTLE_MARGIN_S, gt=0)
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    # How long the gateway keeps an async job and its result (``api_jobs``).
    job_retention_days: float = Field(default=7.0, gt=0)
    # How long uploaded files and a batch's output and error files are kept (OpenAI's 30 days).
    file_retention_days: float = Field(default=30.0, gt=0)
    # A stored batch's lines sent and not yet answered, at most (broker/gateway/batches).
    batch_in_flight: int = Field(default=2000, ge=1)
    # How long a batch stays with a batch runner that stopped renewing its lease (it died).
    batch_lease_s: float = Field(default=30.0, gt=0)
    # /metrics for Prometheus (``--metrics-port`` overrides): off unless a port is given.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # RabbitMQ's management API, for the queue gauges; default: the AMQP URL's host and
    # credentials on port 15672.
    rabbitmq_api_url: str | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

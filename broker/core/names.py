"""The one place that names queues, exchanges and Redis keys. Nobody else builds these strings."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Names"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

# AMQP `type` of what arrives on a reply queue.
TYPE_RESULT = "switchyard.result"
TYPE_CHUNK = "switchyard.chunk"

# Header names carried on AMQP messages.
HEADER_KEY = "x-switchyard-key"
HEADER_TRACEPARENT = "traceparent"
HEADER_DEAD_REASON = "x-switchyard-dead-reason"
HEADER_DEAD_CODE = "x-switchyard-dead-code"
HEADER_DEAD_QUEUE = "x-switchyard-dead-queue"


@dataclass(frozen=True, slots=True)
class Names:
    """Names for one namespace (``switchyard`` in production, a random one per test session)."""

    namespace: str = "switchyard"

    @property
    def jobs(self) -> str:
        return f"{self.namespace}.jobs"

    def provider(self, provider_id: str, lane: int = 0) -> str:
        """A provider's queue; lanes above 0 are its fairness lanes (``state/fairness.py``)."""
        base = f"{self.namespace}.provider.{provider_id}"
        return base if lane == 0 else f"{base}.{lane}"

    @property
    def reroute(self) -> str:
        """Jobs a provider failed, handed back by its worker for the scheduler to route to the
        next candidate (failover). Internal, like the provider queues: its jobs carry a route."""
        return f"{self.namespace}.reroute"

    @property
    def usage(self) -> str:
        return f"{self.namespace}.usage"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def alerts(self) -> str:
        """Budget and limit threshold alerts (80 %, 95 %), one message each per window."""
        return f"{self.namespace}.alerts"

    def park(self, delay_s: int) -> str:
        """A TTL queue that holds a job ``delay_s`` seconds, then dead-letters it back to jobs."""
        return f"{self.namespace}.park.{delay_s}s"

    @property
    def config(self) -> str:
        """A fanout exchange: each new config version, to every process (which binds its own
        exclusive queue)."""
        return f"{self.namespace}.config"

    def config_listener(self, process_tag: str) -> str:
        """One process's exclusive, auto-deleted queue bound to the config exchange."""
        return f"{self.namespace}.config.{process_tag}"

    @property
    def webhooks(self) -> str:
        return f"{self.namespace}.webhooks"

    def results(self, name: str) -> str:
        """A durable results queue for batch producers."""
        return f"{self.namespace}.results.{name}"

    def redis_key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

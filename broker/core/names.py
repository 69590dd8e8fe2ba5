"""The one place that names queues, exchanges, headers, Redis keys and Prometheus metrics: no
other module spells these strings, so two spellings of one name cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DIRECT_REPLY_TO",
    "HEADER_DEAD_CODE",
    "HEADER_DEAD_QUEUE",
    "HEADER_DEAD_REASON",
    "HEADER_DEFERRED",
    "HEADER_KEY",
    "HEADER_PARKED",
    "HEADER_REDELIVERED",
    "HEADER_TRACEPARENT",
    "METRIC_CIRCUIT_OPENED",
    "METRIC_CIRCUIT_OPENED_LABELS",
    "METRIC_QUOTA_ALERTS",
    "METRIC_QUOTA_ALERTS_LABELS",
    "QUOTA_ALERT_INFIX",
    "TYPE_CHUNK",
    "TYPE_RESULT",
    "TYPE_STANDING",
    "Names",
]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

# AMQP `type` of what arrives on a reply queue.
TYPE_RESULT = "switchyard.result"
TYPE_CHUNK = "switchyard.chunk"
TYPE_STANDING = "switchyard.standing"

# Header names carried on AMQP messages.
HEADER_KEY = "x-switchyard-key"
HEADER_TRACEPARENT = "traceparent"
HEADER_DEAD_REASON = "x-switchyard-dead-reason"
HEADER_DEAD_CODE = "x-switchyard-dead-code"
HEADER_DEAD_QUEUE = "x-switchyard-dead-queue"
HEADER_PARKED = "x-switchyard-parked"  # how many times a job waiting for quota was parked
HEADER_REDELIVERED = "x-switchyard-redelivered"  # came again: a twin may have been served
HEADER_DEFERRED = "x-switchyard-deferred"  # a job waiting for a cheaper hour: since (ISO 8601)

# Prometheus metrics (``broker.core.metrics`` builds them): each name with its label names.
METRIC_QUOTA_ALERTS = "switchyard_quota_alerts_total"
METRIC_QUOTA_ALERTS_LABELS = ("label", "threshold_percent")
METRIC_CIRCUIT_OPENED = "switchyard_circuit_opened_total"
METRIC_CIRCUIT_OPENED_LABELS = ("provider",)

QUOTA_ALERT_INFIX = ":alert:"
"""A quota bucket's threshold marker is ``<bucket key>:alert:<percent>``; the quota scripts build
it from the bucket's key, so that it expires with its counter."""


@dataclass(frozen=True, slots=True)
class Names:
    """Names for one namespace (``switchyard`` in production, a random one per test session)."""

    namespace: str = "switchyard"

    # --- AMQP queues and exchanges -----------------------------------------------------------

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
        """Budget and limit threshold alerts (the config's ``alerts``), one each per window."""
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
    def cancels(self) -> str:
        """A fanout exchange: ids of untracked jobs whose callers went away, to every scheduler
        and worker (``broker.transport.cancels``)."""
        return f"{self.namespace}.cancels"

    def cancels_listener(self, process_tag: str) -> str:
        """One process's exclusive, auto-deleted queue bound to the cancels exchange."""
        return f"{self.namespace}.cancels.{process_tag}"

    @property
    def control(self) -> str:
        """Questions about jobs (``JobQuery``: where one stands, cancel it), answered by a
        scheduler on the asker's reply queue."""
        return f"{self.namespace}.control"

    @property
    def webhooks(self) -> str:
        """Events to POST to webhooks (``WebhookRequest``), for the webhook dispatcher."""
        return f"{self.namespace}.webhooks"

    def results(self, name: str) -> str:
        """A durable results queue for batch producers."""
        return f"{self.namespace}.results.{name}"

    # --- Redis keys --------------------------------------------------------------------------

    def redis_key(self, *parts: str) -> str:
        """``<namespace>:<part>:...``, the form of every key below."""
        return ":".join((self.namespace, *parts))

    def quota_bucket(self, scope: str, scope_id: str, metric: str, window_id: str) -> str:
        """The counter of one limit in one window, e.g. ``("key", "team-a", "rpm", w.id)``."""
        return self.redis_key("quota", scope, scope_id, metric, window_id)

    @property
    def quota_holds(self) -> str:
        """A sorted set of held reservations by the end of their hold, for the expiry sweep."""
        return self.redis_key("quota-holds")

    @property
    def quota_epoch(self) -> str:
        """Written when the quota counters are known whole (rebuilt from the ledger); its
        absence means Redis lost them. The value changes with each rebuild."""
        return self.redis_key("quota-epoch")

    def reservation(self, reservation_id: str) -> str:
        """A reservation's record (a hash); ``""`` gives the prefix the sweep appends ids to."""
        return self.redis_key("reservation", reservation_id)

    def answered(self, job_id: str) -> str:
        """A persistent job's result: ``pending`` while one delivery publishes it, ``done``
        once it is out, so a twin of the job (run again after a process died) publishes none."""
        return self.redis_key("answered", job_id)

    def job(self, job_id: str) -> str:
        """A tracked job's record (a hash: state, provider, priority, owner, estimated cost;
        ``broker.state.job_states``)."""
        return self.redis_key("job", job_id)

    def job_queue(self, provider_id: str) -> str:
        """The tracked jobs queued for a provider, by priority then arrival (a sorted set;
        ``""`` gives the prefix a script appends the provider to)."""
        return self.redis_key("job-queue", provider_id)

    def job_expiry(self, provider_id: str) -> str:
        """The same jobs by deadline, so those RabbitMQ dropped leave ``job_queue``."""
        return self.redis_key("job-expiry", provider_id)

    def job_served(self, provider_id: str, second: int) -> str:
        """Calls a provider's workers started in one second (unix time; for ETAs)."""
        return self.redis_key("job-served", provider_id, str(second))

    def idempotency(self, caller: str, key_digest: str) -> str:
        """One caller's idempotency key (by its digest): the first job's id and, once it
        ended, its result (``broker.state.idempotency``)."""
        return self.redis_key("idem", caller, key_digest)

    def circuit(self, provider_id: str) -> str:
        """A provider's circuit breaker (a hash: ``failures``, ``open_until``)."""
        return self.redis_key("circuit", provider_id)

    def lease(self, provider_id: str) -> str:
        """A sorted set of one provider's concurrency leases (lease id -> expiry)."""
        return self.redis_key("lease", provider_id)

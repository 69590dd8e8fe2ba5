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
    "METRIC_ACCOUNTANT_LAG",
    "METRIC_ACCOUNTANT_LAG_LABELS",
    "METRIC_CIRCUIT_OPENED",
    "METRIC_CIRCUIT_OPENED_LABELS",
    "METRIC_CIRCUIT_STATE",
    "METRIC_CIRCUIT_STATE_LABELS",
    "METRIC_COST",
    "METRIC_COST_LABELS",
    "METRIC_FAILOVERS",
    "METRIC_FAILOVERS_LABELS",
    "METRIC_HTTP_DURATION",
    "METRIC_HTTP_DURATION_LABELS",
    "METRIC_HTTP_REQUESTS",
    "METRIC_HTTP_REQUESTS_LABELS",
    "METRIC_JOBS_FINISHED",
    "METRIC_JOBS_FINISHED_LABELS",
    "METRIC_JOBS_SUBMITTED",
    "METRIC_JOBS_SUBMITTED_LABELS",
    "METRIC_JOB_DURATION",
    "METRIC_JOB_DURATION_LABELS",
    "METRIC_JOB_WAIT",
    "METRIC_JOB_WAIT_LABELS",
    "METRIC_PARKED",
    "METRIC_PARKED_LABELS",
    "METRIC_PROVIDER_ERRORS",
    "METRIC_PROVIDER_ERRORS_LABELS",
    "METRIC_PROVIDER_ERROR_RATE",
    "METRIC_PROVIDER_ERROR_RATE_LABELS",
    "METRIC_PROVIDER_LATENCY",
    "METRIC_PROVIDER_LATENCY_LABELS",
    "METRIC_PROVIDER_P50",
    "METRIC_PROVIDER_P50_LABELS",
    "METRIC_PROVIDER_TTFT",
    "METRIC_PROVIDER_TTFT_LABELS",
    "METRIC_PROVIDER_UP",
    "METRIC_PROVIDER_UP_LABELS",
    "METRIC_QUEUE_AGE",
    "METRIC_QUEUE_AGE_LABELS",
    "METRIC_QUEUE_CONSUMERS",
    "METRIC_QUEUE_CONSUMERS_LABELS",
    "METRIC_QUEUE_MESSAGES",
    "METRIC_QUEUE_MESSAGES_LABELS",
    "METRIC_QUOTA_ALERTS",
    "METRIC_QUOTA_ALERTS_LABELS",
    "METRIC_QUOTA_LIMIT",
    "METRIC_QUOTA_LIMIT_LABELS",
    "METRIC_QUOTA_USED",
    "METRIC_QUOTA_USED_LABELS",
    "METRIC_RETRIES",
    "METRIC_RETRIES_LABELS",
    "METRIC_TOKENS",
    "METRIC_TOKENS_LABELS",
    "METRIC_WEBHOOK_ATTEMPTS",
    "METRIC_WEBHOOK_ATTEMPTS_LABELS",
    "METRIC_WEBHOOK_DELIVERIES",
    "METRIC_WEBHOOK_DELIVERIES_LABELS",
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
# Labels are bounded: providers, models and task types from the config ("other" for a name the
# config does not know), keys by their public id, error codes from ``ErrorCode``; never a job id.
METRIC_JOBS_SUBMITTED = "switchyard_jobs_submitted_total"
METRIC_JOBS_SUBMITTED_LABELS = ("priority", "model", "task_type")
METRIC_JOBS_FINISHED = "switchyard_jobs_finished_total"
METRIC_JOBS_FINISHED_LABELS = ("status", "priority", "provider", "model", "task_type")
METRIC_JOB_WAIT = "switchyard_job_wait_seconds"  # submitted -> handed to a worker's call
METRIC_JOB_WAIT_LABELS = ("priority",)
METRIC_JOB_DURATION = "switchyard_job_duration_seconds"  # submitted -> result
METRIC_JOB_DURATION_LABELS = ("priority",)
METRIC_TOKENS = "switchyard_tokens_total"
METRIC_TOKENS_LABELS = ("provider", "model", "key", "task_type", "kind")  # kind: prompt|completion
METRIC_COST = "switchyard_cost_usd_total"
METRIC_COST_LABELS = ("provider", "model", "key", "task_type")
METRIC_PROVIDER_LATENCY = "switchyard_provider_latency_seconds"  # each call that answered
METRIC_PROVIDER_LATENCY_LABELS = ("provider", "model")
METRIC_PROVIDER_TTFT = "switchyard_provider_ttft_seconds"  # streamed calls: first chunk
METRIC_PROVIDER_TTFT_LABELS = ("provider", "model")
METRIC_PROVIDER_ERRORS = "switchyard_provider_errors_total"  # each failed call, by error code
METRIC_PROVIDER_ERRORS_LABELS = ("provider", "model", "error")
METRIC_RETRIES = "switchyard_provider_retries_total"  # calls after a job's first on one provider
METRIC_RETRIES_LABELS = ("provider", "model")
METRIC_FAILOVERS = "switchyard_failovers_total"  # jobs handed from a provider to the next one
METRIC_FAILOVERS_LABELS = ("provider",)
METRIC_CIRCUIT_STATE = "switchyard_circuit_state"  # 0 closed, 1 half-open, 2 open
METRIC_CIRCUIT_STATE_LABELS = ("provider",)
METRIC_CIRCUIT_OPENED = "switchyard_circuit_opened_total"
METRIC_CIRCUIT_OPENED_LABELS = ("provider",)
METRIC_PROVIDER_UP = "switchyard_provider_status"  # 1 for the provider's measured status
METRIC_PROVIDER_UP_LABELS = ("provider", "status")  # status: up|degraded|down
METRIC_PROVIDER_ERROR_RATE = "switchyard_provider_error_rate"  # measured, rolling window
METRIC_PROVIDER_ERROR_RATE_LABELS = ("provider", "model")
METRIC_PROVIDER_P50 = "switchyard_provider_p50_latency_seconds"  # measured, rolling window
METRIC_PROVIDER_P50_LABELS = ("provider", "model")
METRIC_QUOTA_USED = "switchyard_quota_used"  # current window; metric as configured: usd_per_day
METRIC_QUOTA_USED_LABELS = ("scope", "scope_id", "metric")
METRIC_QUOTA_LIMIT = "switchyard_quota_limit"
METRIC_QUOTA_LIMIT_LABELS = ("scope", "scope_id", "metric")
METRIC_QUOTA_ALERTS = "switchyard_quota_alerts_total"  # budget and limit alerts raised
METRIC_QUOTA_ALERTS_LABELS = ("label", "threshold_percent")
METRIC_PARKED = "switchyard_jobs_parked_total"
METRIC_PARKED_LABELS = ("reason",)  # quota | repeat | redis (away) | deferral
METRIC_QUEUE_MESSAGES = "switchyard_queue_messages"  # ready, per queue (RabbitMQ's count)
METRIC_QUEUE_MESSAGES_LABELS = ("queue",)  # the name without "<ns>.": jobs, provider.openai.2
METRIC_QUEUE_AGE = "switchyard_queue_oldest_message_age_seconds"
METRIC_QUEUE_AGE_LABELS = ("queue",)
METRIC_QUEUE_CONSUMERS = "switchyard_queue_consumers"
METRIC_QUEUE_CONSUMERS_LABELS = ("queue",)
METRIC_WEBHOOK_DELIVERIES = "switchyard_webhook_deliveries_total"  # deliveries that ended
METRIC_WEBHOOK_DELIVERIES_LABELS = ("outcome",)  # delivered | dead
METRIC_WEBHOOK_ATTEMPTS = "switchyard_webhook_attempts_total"  # each POST
METRIC_WEBHOOK_ATTEMPTS_LABELS = ("outcome",)  # 2xx | 3xx | 4xx | 5xx | error
METRIC_HTTP_REQUESTS = "switchyard_http_requests_total"  # the gateway's
METRIC_HTTP_REQUESTS_LABELS = ("route", "method", "status")
METRIC_HTTP_DURATION = "switchyard_http_request_duration_seconds"
METRIC_HTTP_DURATION_LABELS = ("route",)
METRIC_ACCOUNTANT_LAG = "switchyard_accountant_lag_seconds"  # oldest event in the last write
METRIC_ACCOUNTANT_LAG_LABELS: tuple[str, ...] = ()

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

    def provider_stats(self, provider_id: str, model: str) -> str:
        """A provider model's last calls, newest first: ``"<unix s> <latency ms> <unwell>"``
        (a list; ``broker.state.provider_stats``)."""
        return self.redis_key("pstats", provider_id, model)

    def provider_stats_pushed(self, provider_id: str, model: str) -> str:
        """How many samples were ever pushed to ``provider_stats`` (a reader fetches only the
        ones since its last read)."""
        return self.redis_key("pstats-pushed", provider_id, model)

    def lease(self, provider_id: str) -> str:
        """A sorted set of one provider's concurrency leases (lease id -> expiry)."""
        return self.redis_key("lease", provider_id)

"""Prometheus metrics, built from the names and label sets in ``broker.core.names``; each
process serves its own on ``/metrics`` (``serve_metrics``), ``switchyard up`` one for its parts.

Where each is counted is chosen so that one process counts it once: the accountant counts what
the ledger records (finished jobs, tokens, cost, wait and end-to-end times) from the rows it
writes, so the figures equal Postgres's; the workers count calls; the scheduler counts submissions,
parking and failovers and exports the gauges it reads (queues, quota, measured provider state).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from broker.core import names as n

__all__ = [
    "ACCOUNTANT_LAG",
    "CIRCUIT_OPENED",
    "CIRCUIT_STATE",
    "COST",
    "FAILOVERS",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "JOBS_FINISHED",
    "JOBS_SUBMITTED",
    "JOB_DURATION",
    "JOB_WAIT",
    "OTHER",
    "PARKED",
    "PROVIDER_ERRORS",
    "PROVIDER_ERROR_RATE",
    "PROVIDER_LATENCY",
    "PROVIDER_P50",
    "PROVIDER_STATUS",
    "PROVIDER_TTFT",
    "QUEUE_AGE",
    "QUEUE_CONSUMERS",
    "QUEUE_MESSAGES",
    "QUOTA_ALERTS",
    "QUOTA_LIMIT",
    "QUOTA_USED",
    "RETRIES",
    "TOKENS",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_DELIVERIES",
    "bounded",
    "serve_metrics",
]

OTHER = "other"
"""The label value for a name the config does not know (a job may name any model)."""

# Seconds: a call or a job from 10 ms to 10 minutes (a deferred batch line waits hours: +Inf).
_SPAN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def bounded(value: str | None, known: Iterable[str]) -> str:
    """``value`` as a label: "" for none, ``OTHER`` for a name outside ``known``, so a caller
    cannot grow a series per made-up model name."""
    if not value:
        return ""
    return value if value in known else OTHER


def serve_metrics(port: int, host: str) -> None:
    """``/metrics`` for this process's registry on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host)


JOBS_SUBMITTED = Counter(
    n.METRIC_JOBS_SUBMITTED,
    "Jobs the scheduler took in, once each (not again after parking or failover).",
    n.METRIC_JOBS_SUBMITTED_LABELS,
)
JOBS_FINISHED = Counter(
    n.METRIC_JOBS_FINISHED,
    "Jobs recorded as ended in the ledger, by status (succeeded or the error code).",
    n.METRIC_JOBS_FINISHED_LABELS,
)
JOB_WAIT = Histogram(
    n.METRIC_JOB_WAIT,
    "From submission to the job's dispatch to a worker's call (queued and scheduled).",
    n.METRIC_JOB_WAIT_LABELS,
    buckets=_SPAN_BUCKETS,
)
JOB_DURATION = Histogram(
    n.METRIC_JOB_DURATION,
    "From submission to the job's result, as the ledger records it.",
    n.METRIC_JOB_DURATION_LABELS,
    buckets=_SPAN_BUCKETS,
)
TOKENS = Counter(n.METRIC_TOKENS, "Tokens in the ledger's usage rows.", n.METRIC_TOKENS_LABELS)
COST = Counter(n.METRIC_COST, "USD in the ledger's usage rows.", n.METRIC_COST_LABELS)
PROVIDER_LATENCY = Histogram(
    n.METRIC_PROVIDER_LATENCY,
    "Provider calls that answered: request to last byte.",
    n.METRIC_PROVIDER_LATENCY_LABELS,
    buckets=_SPAN_BUCKETS,
)
PROVIDER_TTFT = Histogram(
    n.METRIC_PROVIDER_TTFT,
    "Streamed provider calls: request to first chunk.",
    n.METRIC_PROVIDER_TTFT_LABELS,
    buckets=_SPAN_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    n.METRIC_PROVIDER_ERRORS,
    "Provider calls that failed, by error code.",
    n.METRIC_PROVIDER_ERRORS_LABELS,
)
RETRIES = Counter(
    n.METRIC_RETRIES,
    "Calls retried on the same provider after a failed one.",
    n.METRIC_RETRIES_LABELS,
)
FAILOVERS = Counter(
    n.METRIC_FAILOVERS,
    "Jobs a provider failed, handed back to be routed to the next candidate.",
    n.METRIC_FAILOVERS_LABELS,
)
CIRCUIT_STATE = Gauge(
    n.METRIC_CIRCUIT_STATE,
    "A provider's circuit as this process sees it: 0 closed, 1 half-open, 2 open.",
    n.METRIC_CIRCUIT_STATE_LABELS,
)
CIRCUIT_OPENED = Counter(
    n.METRIC_CIRCUIT_OPENED,
    "Times a provider's circuit breaker opened (counted by the process whose call opened it).",
    n.METRIC_CIRCUIT_OPENED_LABELS,
)
PROVIDER_STATUS = Gauge(
    n.METRIC_PROVIDER_UP,
    "1 for a provider's measured status (up, degraded or down), 0 for the others.",
    n.METRIC_PROVIDER_UP_LABELS,
)
PROVIDER_ERROR_RATE = Gauge(
    n.METRIC_PROVIDER_ERROR_RATE,
    "Share of a provider model's recent calls that failed for the provider's own reasons.",
    n.METRIC_PROVIDER_ERROR_RATE_LABELS,
)
PROVIDER_P50 = Gauge(
    n.METRIC_PROVIDER_P50,
    "Median latency of a provider model's recent calls that answered.",
    n.METRIC_PROVIDER_P50_LABELS,
)
QUOTA_USED = Gauge(
    n.METRIC_QUOTA_USED,
    "A limit's use in its current window (requests, tokens or USD).",
    n.METRIC_QUOTA_USED_LABELS,
)
QUOTA_LIMIT = Gauge(n.METRIC_QUOTA_LIMIT, "A limit's size per window.", n.METRIC_QUOTA_LIMIT_LABELS)
QUOTA_ALERTS = Counter(
    n.METRIC_QUOTA_ALERTS,
    "Limits and budgets that crossed an alert threshold (once per window).",
    n.METRIC_QUOTA_ALERTS_LABELS,
)
PARKED = Counter(
    n.METRIC_PARKED,
    "Jobs parked to come back later: waiting for quota, a repeat's first job, or a cheaper hour.",
    n.METRIC_PARKED_LABELS,
)
QUEUE_MESSAGES = Gauge(
    n.METRIC_QUEUE_MESSAGES, "Messages ready in a queue.", n.METRIC_QUEUE_MESSAGES_LABELS
)
QUEUE_AGE = Gauge(
    n.METRIC_QUEUE_AGE,
    "Age of the message at a queue's head (0 when empty).",
    n.METRIC_QUEUE_AGE_LABELS,
)
QUEUE_CONSUMERS = Gauge(
    n.METRIC_QUEUE_CONSUMERS, "Consumers of a queue.", n.METRIC_QUEUE_CONSUMERS_LABELS
)
WEBHOOK_DELIVERIES = Counter(
    n.METRIC_WEBHOOK_DELIVERIES,
    "Webhook deliveries that ended: delivered, or dead after the last try.",
    n.METRIC_WEBHOOK_DELIVERIES_LABELS,
)
WEBHOOK_ATTEMPTS = Counter(
    n.METRIC_WEBHOOK_ATTEMPTS,
    "Webhook POSTs, by the receiver's status class or error.",
    n.METRIC_WEBHOOK_ATTEMPTS_LABELS,
)
HTTP_REQUESTS = Counter(
    n.METRIC_HTTP_REQUESTS, "The gateway's HTTP requests.", n.METRIC_HTTP_REQUESTS_LABELS
)
HTTP_DURATION = Histogram(
    n.METRIC_HTTP_DURATION,
    "The gateway's HTTP requests: first byte in to last byte out.",
    n.METRIC_HTTP_DURATION_LABELS,
    buckets=_HTTP_BUCKETS,
)
ACCOUNTANT_LAG = Gauge(
    n.METRIC_ACCOUNTANT_LAG,
    "Age of the oldest event in the accountant's last write to Postgres.",
    n.METRIC_ACCOUNTANT_LAG_LABELS,
)

"""Overview: jobs in and out, failures, end-to-end latency, queue depth and wait by priority,
the gateway's requests and the webhooks' deliveries."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from ops.grafana.panels import RATE, Panel, board, quantiles, stat_panel, timeseries

__all__ = ["ACTIVE_QUEUES", "overview"]

ACTIVE_QUEUES = 'queue=~"jobs|reroute|provider[.].+"'
"""The queues jobs wait in on their way to a provider (not parking, results or the ledger's)."""

SUBMITTED = "switchyard_jobs_submitted_total"
FINISHED = "switchyard_jobs_finished_total"
FAILED_SHARE = (
    f'1 - sum(rate({FINISHED}{{status="succeeded"}}[{RATE}])) / sum(rate({FINISHED}[{RATE}]))'
)


def _headline() -> list[Panel]:
    return [
        stat_panel(
            "Jobs submitted",
            "Jobs the scheduler took in per second (each once, not again after parking).",
            f"sum(rate({SUBMITTED}[{RATE}]))",
            "suffix: jobs/s",
        ),
        stat_panel(
            "Failed jobs",
            "Share of the jobs the ledger recorded as ended that did not succeed.",
            FAILED_SHARE,
            "percentunit",
            steps=((None, "green"), (0.01, "orange"), (0.05, "red")),
        ),
        stat_panel(
            "Job duration p95",
            "Submission to result, 95th percentile over all priorities.",
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(switchyard_job_duration_seconds_bucket[{RATE}])))",
            "s",
        ),
        stat_panel(
            "Jobs queued",
            "Messages ready in the jobs, reroute and provider queues.",
            f"sum(max by (queue) (switchyard_queue_messages{{{ACTIVE_QUEUES}}}))",
            "short",
            steps=((None, "green"), (100, "orange"), (1000, "red")),
        ),
    ]


def _jobs() -> list[Panel]:
    return [
        timeseries(
            "Jobs submitted by priority",
            "Jobs per second entering the scheduler, by the job's priority (0-9).",
            [(f"sum by (priority) (rate({SUBMITTED}[{RATE}]))", "priority {{priority}}")],
            "suffix: jobs/s",
            stacked=True,
        ),
        timeseries(
            "Jobs finished by status",
            "Jobs per second the ledger recorded as ended: succeeded, or the error code.",
            [(f"sum by (status) (rate({FINISHED}[{RATE}]))", "{{status}}")],
            "suffix: jobs/s",
            stacked=True,
        ),
        timeseries(
            "Job duration (submission to result)",
            "End-to-end time of the jobs that ended, all priorities.",
            quantiles("switchyard_job_duration_seconds", ""),
            "s",
        ),
        timeseries(
            "Failed jobs (share)",
            "Share of ended jobs that did not succeed.",
            [(FAILED_SHARE, "failed")],
            "percentunit",
        ),
    ]


def _waiting() -> list[Panel]:
    return [
        timeseries(
            "Queue depth",
            "Messages ready in the queues jobs wait in for a provider.",
            [(f"max by (queue) (switchyard_queue_messages{{{ACTIVE_QUEUES}}})", "{{queue}}")],
            "short",
        ),
        timeseries(
            "Wait time by priority (p95)",
            "Submission to dispatch to a worker's call, 95th percentile, by priority.",
            quantiles("switchyard_job_wait_seconds", "priority", qs=(0.95,)),
            "s",
        ),
    ]


def _edges() -> list[Panel]:
    return [
        timeseries(
            "Gateway requests by route and status",
            "HTTP requests per second at the gateways, by route template and status.",
            [
                (
                    f"sum by (route, status) (rate(switchyard_http_requests_total[{RATE}]))",
                    "{{route}} {{status}}",
                )
            ],
            "reqps",
        ),
        timeseries(
            "Webhook attempts and deliveries",
            "POSTs to webhook receivers by outcome (status class or error), and deliveries"
            " that ended: delivered, or dead after the last try.",
            [
                (
                    f"sum by (outcome) (rate(switchyard_webhook_attempts_total[{RATE}]))",
                    "attempt {{outcome}}",
                ),
                (
                    f"sum by (outcome) (rate(switchyard_webhook_deliveries_total[{RATE}]))",
                    "delivery {{outcome}}",
                ),
            ],
            "reqps",
        ),
    ]


def overview() -> Dashboard:
    return board(
        "switchyard-overview",
        "Switchyard / Overview",
        "Jobs in and out, failures, latency, how long jobs wait by priority, and the edges:"
        " HTTP in, webhooks out.",
        [("Now", _headline()), ("Jobs", _jobs()), ("Waiting", _waiting()), ("Edges", _edges())],
    )

"""Queues: depth, age and consumers per queue; rates and waits per priority; parked jobs."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from ops.grafana.panels import RATE, Panel, board, quantiles, stat_panel, timeseries

__all__ = ["queues"]

WAIT = "switchyard_job_wait_seconds"


def _queues() -> list[Panel]:
    return [
        timeseries(
            "Ready messages",
            "Messages ready in each queue (the name without the namespace).",
            [("max by (queue) (switchyard_queue_messages)", "{{queue}}")],
            "short",
        ),
        timeseries(
            "Oldest message age",
            "Age of the message at each queue's head (0 when the queue is empty).",
            [("max by (queue) (switchyard_queue_oldest_message_age_seconds)", "{{queue}}")],
            "s",
        ),
        timeseries(
            "Consumers",
            "Consumers of each queue.",
            [("max by (queue) (switchyard_queue_consumers)", "{{queue}}")],
            "short",
        ),
        stat_panel(
            "Dead letters",
            "Messages in the dead-letter queue, waiting for someone to look.",
            'max(switchyard_queue_messages{queue="dead"})',
            "short",
            steps=((None, "green"), (1, "red")),
        ),
        stat_panel(
            "Accountant lag",
            "Age of the oldest event in the accountant's last write to the ledger.",
            "max(switchyard_accountant_lag_seconds)",
            "s",
            steps=((None, "green"), (30, "orange"), (60, "red")),
        ),
    ]


def _priorities() -> list[Panel]:
    return [
        timeseries(
            "Submitted by priority",
            "Jobs per second entering the scheduler, by priority.",
            [
                (
                    f"sum by (priority) (rate(switchyard_jobs_submitted_total[{RATE}]))",
                    "priority {{priority}}",
                )
            ],
            "suffix: jobs/s",
            stacked=True,
        ),
        timeseries(
            "Finished by priority",
            "Jobs per second the ledger recorded as ended, by priority.",
            [
                (
                    f"sum by (priority) (rate(switchyard_jobs_finished_total[{RATE}]))",
                    "priority {{priority}}",
                )
            ],
            "suffix: jobs/s",
            stacked=True,
        ),
        timeseries(
            "Wait time by priority (p50)",
            "Submission to dispatch to a worker's call: median, by priority.",
            quantiles(WAIT, "priority", qs=(0.5,)),
            "s",
        ),
        timeseries(
            "Wait time by priority (p99)",
            "Submission to dispatch to a worker's call: 99th percentile, by priority.",
            quantiles(WAIT, "priority", qs=(0.99,)),
            "s",
        ),
    ]


def _parking() -> list[Panel]:
    return [
        timeseries(
            "Jobs parked",
            "Jobs per second parked to come back later: waiting for quota, for a repeat's "
            "first job, or for a cheaper hour (deferral).",
            [
                (
                    f"sum by (reason) (rate(switchyard_jobs_parked_total[{RATE}]))",
                    "{{reason}}",
                )
            ],
            "suffix: jobs/s",
        ),
        timeseries(
            "Parked now",
            "Jobs held in each park queue until their delay ends.",
            [('max by (queue) (switchyard_queue_messages{queue=~"park[.].+"})', "{{queue}}")],
            "short",
        ),
    ]


def queues() -> Dashboard:
    return board(
        "switchyard-queues",
        "Switchyard / Queues",
        "RabbitMQ's queues as the scheduler reads them, rates and waits per priority, parking.",
        [("Queues", _queues()), ("Priorities", _priorities()), ("Parking", _parking())],
    )

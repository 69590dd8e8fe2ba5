"""Providers: health and circuits, calls and latency, errors, retries and failovers."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from ops.grafana.panels import RATE, Panel, board, quantiles, states, timeseries

__all__ = ["providers"]

ONE = 'provider=~"$provider"'
STATUS = "switchyard_provider_status"


def _health() -> list[Panel]:
    return [
        states(
            "Status",
            "Each provider's measured status (up, degraded, down), as the scheduler sees it.",
            f'max by (provider) ({STATUS}{{status="degraded", {ONE}}}) '
            f'+ 2 * max by (provider) ({STATUS}{{status="down", {ONE}}})',
            "{{provider}}",
            [("up", "green"), ("degraded", "orange"), ("down", "red")],
        ),
        states(
            "Circuit breaker",
            "Each provider's circuit: closed, half-open (probing) or open (no calls).",
            f"max by (provider) (switchyard_circuit_state{{{ONE}}})",
            "{{provider}}",
            [("closed", "green"), ("half-open", "orange"), ("open", "red")],
        ),
        timeseries(
            "Circuits opened",
            "Times each provider's circuit breaker opened, per rate interval.",
            [
                (
                    "sum by (provider) "
                    f"(increase(switchyard_circuit_opened_total{{{ONE}}}[{RATE}]))",
                    "{{provider}}",
                )
            ],
            "short",
        ),
        timeseries(
            "Measured error rate (routing's view)",
            "Share of each provider model's recent calls that failed for the provider's own "
            "reasons: what the rules' provider.error_rate reads.",
            [
                (
                    f"max by (provider, model) (switchyard_provider_error_rate{{{ONE}}})",
                    "{{provider}} {{model}}",
                )
            ],
            "percentunit",
        ),
    ]


def _calls() -> list[Panel]:
    latency = "switchyard_provider_latency_seconds"
    return [
        timeseries(
            "Calls answered",
            "Provider calls per second that answered.",
            [(f"sum by (provider) (rate({latency}_count{{{ONE}}}[{RATE}]))", "{{provider}}")],
            "reqps",
            stacked=True,
        ),
        timeseries(
            "Latency (request to last byte)",
            "Calls that answered, by provider: p50, p95, p99.",
            quantiles(latency, "provider", ONE),
            "s",
        ),
        timeseries(
            "Time to first token (streamed calls)",
            "Streamed calls: request to first chunk, by provider.",
            quantiles("switchyard_provider_ttft_seconds", "provider", ONE, qs=(0.5, 0.95)),
            "s",
        ),
        timeseries(
            "Measured p50 latency (routing's view)",
            "Median latency of each provider model's recent calls, as the fastest policy reads.",
            [
                (
                    f"max by (provider, model) (switchyard_provider_p50_latency_seconds{{{ONE}}})",
                    "{{provider}} {{model}}",
                )
            ],
            "s",
        ),
    ]


def _failures() -> list[Panel]:
    return [
        timeseries(
            "Errors by code",
            "Failed provider calls per second, by provider and error code.",
            [
                (
                    f"sum by (provider, error) (rate(switchyard_provider_errors_total{{{ONE}}}"
                    f"[{RATE}]))",
                    "{{provider}} {{error}}",
                )
            ],
            "reqps",
            width=8,
        ),
        timeseries(
            "Retries",
            "Calls per second made again on the same provider after a failed one.",
            [
                (
                    f"sum by (provider) (rate(switchyard_provider_retries_total{{{ONE}}}[{RATE}]))",
                    "{{provider}}",
                )
            ],
            "reqps",
            width=8,
        ),
        timeseries(
            "Failovers",
            "Jobs per second a provider failed and handed back to go to the next candidate.",
            [
                (
                    f"sum by (provider) (rate(switchyard_failovers_total{{{ONE}}}[{RATE}]))",
                    "{{provider}}",
                )
            ],
            "suffix: jobs/s",
            width=8,
        ),
    ]


def providers() -> Dashboard:
    return board(
        "switchyard-providers",
        "Switchyard / Providers",
        "Each provider's health, circuit breaker, calls, latency, errors and failovers.",
        [("Health", _health()), ("Calls", _calls()), ("Failures", _failures())],
        variables=[("provider", "Provider", STATUS)],
    )

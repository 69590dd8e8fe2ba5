"""Prometheus metrics, one home for every name (exposed on /metrics by the gateway's issue)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["CIRCUIT_OPENED", "QUOTA_ALERTS"]

QUOTA_ALERTS = Counter(
    "switchyard_quota_alerts_total",
    "Limits and budgets that crossed an alert threshold (once per window).",
    ["label", "threshold_percent"],
)

CIRCUIT_OPENED = Counter(
    "switchyard_circuit_opened_total",
    "Times a provider's circuit breaker opened (counted by the process whose call opened it).",
    ["provider"],
)

"""Prometheus metrics, built from the names and label sets in ``broker.core.names`` (counted,
not yet served on /metrics: the operators' issue)."""

from __future__ import annotations

from prometheus_client import Counter

from broker.core.names import (
    METRIC_CIRCUIT_OPENED,
    METRIC_CIRCUIT_OPENED_LABELS,
    METRIC_QUOTA_ALERTS,
    METRIC_QUOTA_ALERTS_LABELS,
)

__all__ = ["CIRCUIT_OPENED", "QUOTA_ALERTS"]

QUOTA_ALERTS = Counter(
    METRIC_QUOTA_ALERTS,
    "Limits and budgets that crossed an alert threshold (once per window).",
    METRIC_QUOTA_ALERTS_LABELS,
)

CIRCUIT_OPENED = Counter(
    METRIC_CIRCUIT_OPENED,
    "Times a provider's circuit breaker opened (counted by the process whose call opened it).",
    METRIC_CIRCUIT_OPENED_LABELS,
)

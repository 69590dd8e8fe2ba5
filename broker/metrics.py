"""Prometheus metrics, one home for every name (exposed on /metrics by the gateway's issue)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["QUOTA_ALERTS"]

QUOTA_ALERTS = Counter(
    "switchyard_quota_alerts_total",
    "Limits and budgets that crossed an alert threshold (once per window).",
    ["label", "threshold_percent"],
)

"""Cost: USD and tokens by provider, model, key and task type; budget burn."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from ops.grafana.panels import RATE, Panel, bar_gauge, board, stat_panel, timeseries

__all__ = ["BUDGET_BURN", "cost"]

PICKED = 'provider=~"$provider", key=~"$key"'
COST = f"switchyard_cost_usd_total{{{PICKED}}}"
TOKENS = f"switchyard_tokens_total{{{PICKED}}}"
BUDGET_BURN = (
    'max by (scope, scope_id, metric) (switchyard_quota_used{metric=~"usd_per_.*"}) '
    '/ max by (scope, scope_id, metric) (switchyard_quota_limit{metric=~"usd_per_.*"} > 0)'
)
"""Each USD budget's share spent in its current window: alerts.yml's budget rules read the same
ratio (a test checks)."""
ALL_LIMITS = (
    "max by (scope, scope_id, metric) (switchyard_quota_used) "
    "/ max by (scope, scope_id, metric) (switchyard_quota_limit > 0)"
)
BURN_STEPS = ((None, "green"), (0.8, "orange"), (0.95, "red"))


def _spend() -> list[Panel]:
    by = [("provider", 12), ("provider, model", 12), ("key", 12), ("task_type", 12)]
    return [
        stat_panel(
            "Spend in range",
            "USD the ledger recorded over the dashboard's time range.",
            f"sum(increase({COST}[$__range]))",
            "currencyUSD",
        ),
        stat_panel(
            "Tokens in range",
            "Prompt and completion tokens the ledger recorded over the time range.",
            f"sum(increase({TOKENS}[$__range]))",
            "short",
        ),
        *(
            timeseries(
                f"USD per hour by {labels.replace('_', ' ')}",
                f"Spend rate by {labels}, as the ledger records it (keys by public id).",
                [
                    (
                        f"sum by ({labels}) (rate({COST}[{RATE}])) * 3600",
                        " ".join(f"{{{{{label.strip()}}}}}" for label in labels.split(",")),
                    )
                ],
                "currencyUSD",
                width=width,
            )
            for labels, width in by
        ),
    ]


def _tokens() -> list[Panel]:
    by = ["provider, kind", "model, kind", "key", "task_type"]
    return [
        timeseries(
            f"Tokens per second by {labels.replace('_', ' ')}",
            f"Tokens (prompt and completion) by {labels}, as the ledger records them.",
            [
                (
                    f"sum by ({labels}) (rate({TOKENS}[{RATE}]))",
                    " ".join(f"{{{{{label.strip()}}}}}" for label in labels.split(",")),
                )
            ],
            "short",
            stacked=True,
        )
        for labels in by
    ]


def _budgets() -> list[Panel]:
    return [
        bar_gauge(
            "Budget burn",
            "Each USD budget's spend in its current window over its limit (alerts at 80 and 95 %).",
            BUDGET_BURN,
            "{{scope}} {{scope_id}}",
            steps=BURN_STEPS,
        ),
        timeseries(
            "Budget burn over time",
            "USD budgets: share of the current window's limit spent.",
            [(BUDGET_BURN, "{{scope}} {{scope_id}}")],
            "percentunit",
        ),
        bar_gauge(
            "Every limit's use",
            "Each quota limit (requests, tokens, USD) in its current window, as a share.",
            ALL_LIMITS,
            "{{scope}} {{scope_id}} {{metric}}",
            width=24,
            steps=BURN_STEPS,
        ),
    ]


def cost() -> Dashboard:
    return board(
        "switchyard-cost",
        "Switchyard / Cost",
        "What the calls cost and how many tokens they used, from the ledger; budget burn.",
        [("Spend", _spend()), ("Tokens", _tokens()), ("Budgets", _budgets())],
        variables=[
            ("provider", "Provider", "switchyard_cost_usd_total"),
            ("key", "Key", "switchyard_cost_usd_total"),
        ],
    )

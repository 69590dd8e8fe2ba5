"""Routing rules: CEL compiled once with declared variables; refusals name the rule, the
expression and the position; evaluation never raises."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from pydantic import ValidationError

from broker.core.errors import ConfigError
from broker.core.rules import (
    VARIABLES,
    CompiledRules,
    Decision,
    Rule,
    RuleContext,
    RuleError,
    now_fields,
)

MEASURED_RULE = (
    'provider.day_tokens_used > 1000000 && now.hour < 6 && request.task_type == "coding"'
)


def rule(name: str, when: str, action: str = "prefer", **extra: Any) -> Rule:
    return Rule.model_validate({"name": name, "when": when, "action": action, **extra})


def context(
    provider: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
    key: dict[str, Any] | None = None,
    now: dict[str, Any] | None = None,
) -> RuleContext:
    return RuleContext(
        request={
            "model": "gpt-4o-mini",
            "task_type": "coding",
            "priority": 5,
            "estimated_tokens": 1200,
            "metadata": {"team": "search"},
            **(request or {}),
        },
        key={"id": "k1", "tags": ["batch"], "consumer": "search", **(key or {})},
        provider={
            "id": "free-tier",
            "status": "up",
            "circuit": "closed",
            "day_tokens_used": 10,
            "day_requests": 1,
            "error_rate": 0.01,
            "p50_latency_ms": 320.0,
            "tags": ["free"],
            "free": True,
            **(provider or {}),
        },
        now={"hour": 3, "minute": 10, "weekday": 0, "date": "2026-11-23", **(now or {})},
    )


def evaluate(rules: list[Rule], ctx: RuleContext | None = None) -> Decision:
    return CompiledRules.compile(rules).evaluate(ctx or context())


def refusal(when: str, name: str = "bad-rule") -> str:
    """Compile [a good rule, the rule under test]; return the ConfigError's message."""
    with pytest.raises(ConfigError) as caught:
        CompiledRules.compile([rule("fine", "provider.free"), rule(name, when)])
    message = str(caught.value)
    assert message.startswith(f"rules.1 ({name}): ")
    assert repr(when) in message.splitlines()[0]
    return message


# --- compiling -----------------------------------------------------------------------------


def test_the_declared_variables_are_the_documented_ones() -> None:
    assert VARIABLES == {
        "request.model": "string",
        "request.task_type": "string",
        "request.priority": "int",
        "request.estimated_tokens": "int",
        "request.metadata": "map<string, dyn>",
        "key.id": "string",
        "key.tags": "list<string>",
        "key.consumer": "string",
        "provider.id": "string",
        "provider.status": "string",
        "provider.circuit": "string",
        "provider.day_tokens_used": "int",
        "provider.day_requests": "int",
        "provider.error_rate": "double",
        "provider.p50_latency_ms": "double",
        "provider.tags": "list<string>",
        "provider.free": "bool",
        "now.hour": "int",
        "now.minute": "int",
        "now.weekday": "int",
        "now.date": "string",
    }


def test_valid_rules_over_every_variable_compile_and_evaluate_cleanly() -> None:
    rules = [
        rule("measured", MEASURED_RULE, "avoid"),
        rule("model", 'request.model.startsWith("gpt-") && request.priority >= 5'),
        rule("tokens", "request.estimated_tokens < 4000 && size(key.tags) > 0"),
        rule("team", 'has(request.metadata.team) && request.metadata.team == "search"'),
        rule("key", 'key.id == "k1" && key.consumer != "" && "batch" in key.tags'),
        rule("health", 'provider.status == "up" && provider.circuit == "closed"'),
        rule("usage", "provider.day_requests < 100 && provider.error_rate < 0.05"),
        rule("latency", "provider.p50_latency_ms < 500.0 && provider.free"),
        rule("tags", 'provider.tags.exists(t, t == "free") && provider.id == "free-tier"'),
        rule("clock", 'now.weekday < 5 && now.minute >= 0 && now.date >= "2026-01-01"'),
        rule("dyn", "request.metadata.urgent", "deny"),
    ]
    decision = evaluate(rules, context(request={"metadata": {"team": "search", "urgent": False}}))
    assert decision.errors == []
    assert decision.matched == [r.name for r in rules[1:-1]]
    assert not decision.excluded


# --- each action ---------------------------------------------------------------------------


def test_deny_excludes_the_provider_when_true() -> None:
    decision = evaluate([rule("no-free", "provider.free", "deny")])
    assert decision.denied == "no-free"
    assert decision.excluded
    assert decision.matched == ["no-free"]

    decision = evaluate([rule("no-free", "provider.free", "deny")], context({"free": False}))
    assert decision.denied is None
    assert not decision.excluded
    assert decision.matched == []


def test_require_excludes_the_provider_when_false() -> None:
    healthy = rule("healthy", 'provider.status == "up"', "require")
    decision = evaluate([healthy], context({"status": "degraded"}))
    assert decision.required_failed == "healthy"
    assert decision.excluded
    assert decision.matched == []

    decision = evaluate([healthy], context({"status": "up"}))
    assert decision.required_failed is None
    assert not decision.excluded
    assert decision.matched == ["healthy"]


def test_prefer_and_avoid_score_without_excluding() -> None:
    rules = [
        rule("cheap", "provider.free", "prefer"),
        rule("slow", "provider.p50_latency_ms > 1000.0", "avoid"),
    ]
    assert evaluate(rules, context({"free": True, "p50_latency_ms": 2000.0})).score == (1, -1)
    assert evaluate(rules, context({"free": False, "p50_latency_ms": 100.0})).score == (0, 0)
    decision = evaluate(rules, context({"free": False, "p50_latency_ms": 2000.0}))
    assert decision.score == (0, -1)
    assert not decision.excluded


def test_set_priority_sets_the_job_priority() -> None:
    rules = [rule("batch", '"batch" in key.tags', "set_priority", value=2)]
    assert evaluate(rules).priority == 2
    assert evaluate(rules, context(key={"tags": []})).priority is None


def test_no_rules_decide_nothing() -> None:
    decision = CompiledRules.compile([]).evaluate(context())
    assert decision == Decision()
    assert not decision.excluded


# --- order ---------------------------------------------------------------------------------


def test_rules_run_in_descending_priority_with_ties_in_file_order() -> None:
    rules = [
        rule("low", "true", "set_priority", value=1, priority=-5),
        rule("tie-a", "true", "set_priority", value=4),
        rule("high", "true", "set_priority", value=9, priority=10),
        rule("tie-b", "true", "set_priority", value=6),
    ]
    compiled = CompiledRules.compile(rules)
    assert [r.name for r in compiled.rules] == ["high", "tie-a", "tie-b", "low"]
    decision = compiled.evaluate(context())
    assert decision.matched == ["high", "tie-a", "tie-b", "low"]
    assert decision.priority == 9
    # Without the top rule, the first of the tied rules in the file wins.
    assert evaluate([rules[0], rules[1], rules[3]]).priority == 4


def test_a_higher_priority_preference_outranks_lower_ones() -> None:
    rules = [
        rule("avoid-slow", "provider.p50_latency_ms > 1000.0", "avoid"),
        rule("not-paid", "!provider.free", "avoid"),
        rule("prefer-fast-lane", '"fast" in provider.tags', "prefer", priority=5),
    ]
    compiled = CompiledRules.compile(rules)
    candidates = {
        "slow-paid-fast-lane": {"p50_latency_ms": 2000.0, "free": False, "tags": ["fast"]},
        "quick-free": {"p50_latency_ms": 100.0, "free": True, "tags": []},
        "slow-free": {"p50_latency_ms": 2000.0, "free": True, "tags": []},
    }
    decisions = {
        pid: compiled.evaluate(context({"id": pid, **fields})) for pid, fields in candidates.items()
    }
    assert decisions["slow-paid-fast-lane"].score == (1, -1, -1)
    ranked = sorted(decisions, key=lambda pid: decisions[pid].score, reverse=True)
    assert ranked == ["slow-paid-fast-lane", "quick-free", "slow-free"]


def test_providers_limits_a_rule_to_those_providers() -> None:
    rules = [rule("only-a", "true", "deny", providers=["a", "c"])]
    compiled = CompiledRules.compile(rules)
    assert compiled.evaluate(context({"id": "a"})).denied == "only-a"
    assert compiled.evaluate(context({"id": "c"})).denied == "only-a"
    skipped = compiled.evaluate(context({"id": "b"}))
    assert skipped.denied is None
    assert skipped.matched == []
    # A rule that does not apply is not evaluated, so it cannot error either.
    broken = CompiledRules.compile([rule("x", "request.metadata.nope", "deny", providers=["a"])])
    assert broken.evaluate(context({"id": "b"})).errors == []
    assert [e.rule for e in broken.evaluate(context({"id": "a"})).errors] == ["x"]


# --- refusals at compile -------------------------------------------------------------------


def test_an_unknown_variable_is_refused_with_its_position() -> None:
    message = refusal("foo.bar > 1")
    assert "1:4: undeclared reference to 'foo.bar'" in message
    assert "    | foo.bar > 1\n    |    ^" in message


def test_an_unknown_field_is_refused_with_its_position() -> None:
    message = refusal("provider.day_token_used > 1")
    assert "1:9: undeclared reference to 'provider.day_token_used'" in message
    assert "day_tokens_used" in message.split("undeclared", 1)[1]  # the hint lists the fields
    assert "    | provider.day_token_used > 1\n    |         ^" in message


def test_a_syntax_error_is_refused_with_its_position() -> None:
    message = refusal("provider.error_rate >")
    assert "1:22: Syntax error" in message
    assert "    | provider.error_rate >\n    |                      ^" in message


def test_a_position_on_a_later_line_points_into_that_line() -> None:
    message = refusal("provider.free &&\n  now.hour < 6 &&\n  nope")
    assert "3:3: undeclared reference to 'nope'" in message
    assert "    |   nope\n    |   ^" in message


def test_a_non_boolean_expression_is_refused() -> None:
    message = refusal("provider.day_tokens_used + 1")
    assert "1:1: must be a boolean expression, but its type is int" in message
    assert "    | provider.day_tokens_used + 1\n    | ^" in message


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ('provider.day_tokens_used == "a"', "no matching overload for '_==_'"),
        ("provider.error_rate > 1", "CEL does not mix int and double"),
        ('"x" in provider.free', "no matching overload"),
    ],
)
def test_wrong_types_are_refused(when: str, reason: str) -> None:
    assert reason in refusal(when)


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"rules\.2 \(a\): duplicate name \(see rules\.0\)"):
        CompiledRules.compile([rule("a", "true"), rule("b", "true"), rule("a", "false")])


# --- the Rule schema -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, -1, 10])
def test_set_priority_needs_a_value_from_0_to_9(value: int | None) -> None:
    with pytest.raises(ValidationError):
        rule("p", "true", "set_priority", value=value)


@pytest.mark.parametrize("value", [0, 9])
def test_set_priority_accepts_the_bounds(value: int) -> None:
    assert rule("p", "true", "set_priority", value=value).value == value


@pytest.mark.parametrize("action", ["prefer", "avoid", "require", "deny"])
def test_value_is_refused_for_other_actions(action: str) -> None:
    with pytest.raises(ValidationError, match="only for set_priority"):
        rule("p", "true", action, value=3)


@pytest.mark.parametrize(
    "data",
    [
        {"name": "r", "when": "true", "action": "boost"},
        {"name": "r", "when": "true", "action": "deny", "weight": 2},
        {"name": "r", "when": "true", "action": "deny", "providers": []},
        {"name": "", "when": "true", "action": "deny"},
        {"name": "r", "when": "", "action": "deny"},
    ],
)
def test_the_rule_schema_refuses_bad_fields(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Rule.model_validate(data)


# --- errors at evaluation ------------------------------------------------------------------


def test_a_runtime_error_is_reported_and_the_rule_does_not_match() -> None:
    rules = [
        rule("team-deny", 'request.metadata.team == "ads"', "deny"),
        rule("team-require", 'request.metadata.team == "ads"', "require"),
        rule("still-works", "provider.free", "prefer"),
    ]
    decision = evaluate(rules, context(request={"metadata": {}}))
    assert [e.rule for e in decision.errors] == ["team-deny", "team-require"]
    assert all(isinstance(e, RuleError) and "team" in e.message for e in decision.errors)
    assert decision.denied is None
    assert decision.required_failed is None
    assert decision.matched == ["still-works"]
    assert decision.score == (1,)
    assert str(decision.errors[0]).startswith("rule 'team-deny': ")


@pytest.mark.parametrize(
    ("when", "ctx", "fragment"),
    [
        ("request.metadata.urgent", context(request={"metadata": {"urgent": 1}}), "not a bool"),
        ("provider.day_tokens_used > 5", context({"day_tokens_used": "many"}), "(Expected INT)"),
        ('"free" in provider.tags', context({"tags": ("free",)}), "'provider.tags': tuple"),
        ("size(request.metadata) > 0", context(request={"metadata": {"t": {1}}}), "set"),
        ("now.hour > 1", context(now={"hour": 10**30}), "too big"),
        ("now.hour > 1", RuleContext(request={}, key={}, provider={}, now={}), "No value"),
        ("provider.day_tokens_used / 0 > 1", context(), "divide by zero"),
    ],
)
def test_bad_values_at_evaluation_become_errors_never_exceptions(
    when: str, ctx: RuleContext, fragment: str
) -> None:
    decision = evaluate([rule("broken", when, "deny"), rule("other", "true", "prefer")], ctx)
    assert decision.denied is None
    assert decision.matched == ["other"]
    assert [e.rule for e in decision.errors] == ["broken"]
    assert fragment in decision.errors[0].message


# --- the measured rule ---------------------------------------------------------------------


def route(
    compiled: CompiledRules, providers: dict[str, dict[str, Any]], **job: dict[str, Any]
) -> str | None:
    """A minimal step 5: drop excluded providers, order the rest by score, take the first."""
    decisions = {
        pid: compiled.evaluate(context({"id": pid, **p}, **job)) for pid, p in providers.items()
    }
    assert all(d.errors == [] for d in decisions.values())
    allowed = [pid for pid, d in decisions.items() if not d.excluded]
    ranked = sorted(allowed, key=lambda pid: decisions[pid].score, reverse=True)
    return ranked[0] if ranked else None


@pytest.mark.parametrize(
    ("used", "hour", "task_type", "expected"),
    [
        (1_000_000, 3, "coding", "free-tier"),
        (1_000_001, 3, "coding", "paid"),
        (1_000_001, 6, "coding", "free-tier"),
        (1_000_001, 3, "chat", "free-tier"),
    ],
)
def test_the_measured_rule_reroutes_exactly_past_the_threshold(
    used: int, hour: int, task_type: str, expected: str
) -> None:
    compiled = CompiledRules.compile(
        [
            rule("free-first", "provider.free", "prefer"),
            rule("spare-free-tier", MEASURED_RULE, "deny", providers=["free-tier"]),
        ]
    )
    providers = {
        "paid": {"free": False, "day_tokens_used": used},
        "free-tier": {"free": True, "day_tokens_used": used},
    }
    chosen = route(compiled, providers, request={"task_type": task_type}, now={"hour": hour})
    assert chosen == expected


def test_now_fields_counts_weekdays_from_monday() -> None:
    assert now_fields(datetime(2026, 11, 23, 5, 7)) == {
        "hour": 5,
        "minute": 7,
        "weekday": 0,
        "date": "2026-11-23",
    }
    assert now_fields(datetime(2026, 11, 29, 23, 59))["weekday"] == 6

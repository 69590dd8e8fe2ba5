"""The router: a pure function of job, config, provider states and clock. Each policy orders as
documented; health, rules, key scopes and quota drop candidates with a reason."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from broker.core.config import Config, KeyConfig, ProviderType, parse_config
from broker.core.errors import Forbidden, ModelUnavailable, NoCapableModel, NoProviderAvailable
from broker.core.pricing import cost_usd
from broker.core.tokens import estimate_prompt_tokens
from broker.scheduler.routing import (
    DEFAULT_OUTPUT_TOKENS,
    Candidate,
    Dropped,
    ProviderState,
    RouteDecision,
    Router,
)
from broker.state.provider_stats import NEVER_ANSWERED_MS
from schemas import CompletionJob

NOON = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
KEY_HASH = "ab" * 32


def provider(pid: str, price: str = "1", **extra: Any) -> dict[str, Any]:
    """A provider serving upstream model ``up`` at ``price`` per million tokens both ways."""
    spec = {"input": price, "output": price, **extra.pop("spec", {})}
    return {
        "id": pid,
        "type": extra.pop("type", "openai"),
        "base_url": "http://127.0.0.1:1/v1",
        "models": {"up": spec},
        **extra,
    }


def config(*providers: dict[str, Any], **top: Any) -> Config:
    """Public model ``m`` is served by every provider, in the order given."""
    data = {
        "providers": list(providers),
        "models": {"m": [{"provider": p["id"], "model": "up"} for p in providers]},
        **top,
    }
    return parse_config(json.dumps(data), "test.json")


def job(model: str | None = "m", **extra: Any) -> CompletionJob:
    return CompletionJob.model_validate(
        {
            "job_id": extra.pop("job_id", "job-1"),
            "model": model,
            "messages": [{"role": "user", "content": "Write a haiku about queues."}],
            "params": {"max_tokens": 100},
            **extra,
        }
    )


def route(
    cfg: Config,
    the_job: CompletionJob | None = None,
    *,
    states: Mapping[str, ProviderState] | None = None,
    now: datetime = NOON,
    key: KeyConfig | None = None,
    **kwargs: Any,
) -> RouteDecision:
    return Router(cfg).route(the_job or job(), key=key, states=states or {}, now=now, **kwargs)


def order(decision: RouteDecision) -> list[str]:
    return [c.provider.id for c in [decision.chosen, *decision.alternatives]]


def unavailable(cfg: Config, the_job: CompletionJob | None = None, **kwargs: Any) -> str:
    with pytest.raises(ModelUnavailable) as caught:
        route(cfg, the_job, **kwargs)
    return caught.value.message


THREE = (provider("mid", "1"), provider("cheap", "0.5"), provider("dear", "2"))


# --- policies ------------------------------------------------------------------------------


def test_free_first_uses_the_free_tier_until_it_is_exhausted_then_the_cheapest_paid() -> None:
    cfg = config(
        provider("paid", "0.5"),
        provider("free", "2", free_tier={"requests_per_day": 100}),
        provider("dear", "3"),
    )
    decision = route(cfg)
    assert order(decision) == ["free", "paid", "dear"]
    assert decision.chosen.free and decision.policy == "free_first"
    assert decision.reason == "free tier first (free has free quota left)"

    exhausted = route(cfg, states={"free": ProviderState(free_remaining=False)})
    assert order(exhausted) == ["paid", "free", "dear"]  # the exhausted tier still sells
    assert not exhausted.chosen.free
    assert exhausted.reason == "free tier first: no free quota left, cheapest of 3"


def test_cheapest_orders_by_estimated_cost() -> None:
    decision = route(config(*THREE, default_policy="cheapest"))
    assert order(decision) == ["cheap", "mid", "dear"]
    assert decision.reason == "cheapest of 3"
    chosen = decision.chosen
    expected = cost_usd(
        config(*THREE).price("cheap", "up"), chosen.est_prompt_tokens, chosen.est_output_tokens
    )
    assert chosen.est_cost_usd == expected and chosen.multiplier == 1


def test_fastest_orders_by_p50_latency_with_the_unmeasured_first() -> None:
    states = {
        "mid": ProviderState(p50_latency_ms=300.0),
        "dear": ProviderState(p50_latency_ms=120.0),
    }
    decision = route(config(*THREE, default_policy="fastest"), states=states)
    assert order(decision) == ["cheap", "dear", "mid"]  # cheap has no calls measured yet
    assert decision.reason == "fastest of 3 (not measured yet)"
    states["cheap"] = ProviderState(p50_latency_ms=500.0)
    decision = route(config(*THREE, default_policy="fastest"), states=states)
    assert order(decision) == ["dear", "mid", "cheap"]
    assert decision.reason == "fastest of 3 (p50 120 ms)"
    # Every recent call of dear failed (no answer to time): last, not first as unmeasured.
    states["dear"] = ProviderState(p50_latency_ms=NEVER_ANSWERED_MS, error_rate=1.0)
    decision = route(config(*THREE, default_policy="fastest"), states=states)
    assert order(decision) == ["mid", "cheap", "dear"]


def test_weighted_is_proportional_to_weight_and_stable_per_job() -> None:
    cfg = config(
        provider("heavy", weight=3), provider("light", weight=1), default_policy="weighted"
    )
    router = Router(cfg)

    def first(job_id: str) -> str:
        decision = router.route(job(job_id=job_id), key=None, states={}, now=NOON)
        return decision.chosen.provider.id

    picks = [first(f"job-{n}") for n in range(2000)]
    share = picks.count("heavy") / len(picks)
    assert 0.71 < share < 0.79, share
    assert all(first(f"job-{n}") == picks[n] for n in range(50))  # a redelivery routes the same
    reason = router.route(job(job_id="job-0"), key=None, states={}, now=NOON).reason
    assert reason.startswith("weighted choice of 2 (weight ")


def test_round_robin_rotates_by_the_counter() -> None:
    cfg = config(*THREE, default_policy="round_robin")
    firsts = [route(cfg, rr_counter=n).chosen.provider.id for n in range(4)]
    assert firsts == ["mid", "cheap", "dear", "mid"]
    assert order(route(cfg, rr_counter=1)) == ["cheap", "dear", "mid"]


def test_priority_tries_the_lowest_number_first() -> None:
    cfg = config(
        provider("a", priority=5),
        provider("b", priority=1),
        provider("c", priority=3),
        default_policy="priority",
    )
    decision = route(cfg)
    assert order(decision) == ["b", "c", "a"]
    assert decision.reason == "priority 1, first of 3"


def test_a_single_candidate_says_so() -> None:
    assert route(config(provider("only"))).reason == "the only candidate"


# --- discounts -----------------------------------------------------------------------------

NIGHT = {"start": "22:00", "end": "06:00", "timezone": "Europe/Paris", "multiplier": "0.1"}


@pytest.mark.parametrize(
    ("now", "winner"),
    [
        (datetime(2026, 1, 15, 21, 30, tzinfo=UTC), "night"),  # 22:30 Paris (UTC+1)
        (datetime(2026, 1, 15, 23, 30, tzinfo=UTC), "night"),  # 00:30 Paris: past midnight
        (datetime(2026, 1, 16, 4, 30, tzinfo=UTC), "night"),  # 05:30 Paris
        (datetime(2026, 1, 16, 5, 0, tzinfo=UTC), "day"),  # 06:00 Paris: the end is excluded
        (datetime(2026, 1, 15, 20, 59, tzinfo=UTC), "day"),  # 21:59 Paris
        (datetime(2026, 7, 15, 4, 30, tzinfo=UTC), "day"),  # 06:30 Paris in summer (UTC+2)
        (datetime(2026, 7, 15, 3, 30, tzinfo=UTC), "night"),  # 05:30 Paris in summer
    ],
)
def test_a_discount_window_wins_inside_it_and_not_outside(now: datetime, winner: str) -> None:
    cfg = config(
        provider("day", "0.5"),
        provider("night", "2", spec={"discounts": [NIGHT]}),
        default_policy="cheapest",
    )
    decision = route(cfg, now=now)
    assert decision.chosen.provider.id == winner
    night = next(c for c in [decision.chosen, *decision.alternatives] if c.provider.id == "night")
    if winner == "night":
        assert night.multiplier == Decimal("0.1")
        assert decision.reason == "cheapest of 2 (discount 0.1 until 06:00 Europe/Paris)"
    else:
        assert night.multiplier == 1 and night.discount is None


def test_the_discounted_cost_is_the_list_cost_times_the_multiplier() -> None:
    cfg = config(provider("night", "2", spec={"discounts": [NIGHT]}))
    at_night = route(cfg, now=datetime(2026, 1, 15, 23, 0, tzinfo=UTC)).chosen
    by_day = route(cfg, now=NOON).chosen
    assert at_night.est_cost_usd == by_day.est_cost_usd * Decimal("0.1")


# --- health --------------------------------------------------------------------------------


def test_open_circuits_and_down_providers_are_dropped_half_open_and_degraded_kept() -> None:
    cfg = config(*THREE, provider("slow", "4"), default_policy="cheapest")
    states = {
        "cheap": ProviderState(circuit="open"),
        "mid": ProviderState(status="down"),
        "dear": ProviderState(circuit="half_open"),
        "slow": ProviderState(status="degraded"),
    }
    decision = route(cfg, states=states)
    assert order(decision) == ["dear", "slow"]
    assert decision.dropped == [
        Dropped("mid", "up", "down"),
        Dropped("cheap", "up", "circuit open"),
    ]


def test_nothing_left_names_why_each_candidate_was_dropped() -> None:
    cfg = config(
        *THREE, rules=[{"name": "no-dear", "when": "true", "action": "deny", "providers": ["dear"]}]
    )
    states = {"cheap": ProviderState(circuit="open"), "mid": ProviderState(status="down")}
    with pytest.raises(NoProviderAvailable) as caught:
        route(cfg, states=states)
    assert caught.value.http_status == 503
    message = caught.value.message
    assert message == (
        "no provider can take model 'm' now: mid/up: down; cheap/up: circuit open;"
        " dear/up: denied by rule 'no-dear'"
    )


def test_a_model_lacking_what_the_job_needs_is_dropped_naming_it() -> None:
    plain = provider("plain", "1", spec={"capabilities": {"streaming": False, "tools": False}})
    narrow = provider(
        "narrow", "2", spec={"context_window": 2000, "capabilities": {"vision": True}}
    )
    cfg = config(plain, narrow, provider("full", "3", spec={"capabilities": {"vision": True}}))
    assert order(route(cfg)) == ["plain", "narrow", "full"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    streamed = route(cfg, job(params={"max_tokens": 10, "stream": True, "tools": [tool]}))
    assert order(streamed) == ["narrow", "full"]
    assert [str(d) for d in streamed.dropped] == ["plain/up: does not stream"]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/q.png"}}
    seen = route(cfg, job(messages=[{"role": "user", "content": [image]}]))
    assert order(seen) == ["narrow", "full"]
    assert [str(d) for d in seen.dropped] == ["plain/up: takes no images"]
    with pytest.raises(NoCapableModel) as caught:  # lasting: 400, not "retry later"
        route(config(plain), job(params={"max_tokens": 10, "stream": True}))
    assert caught.value.http_status == 400
    long = route(cfg, job(params={"max_tokens": 5000}))
    assert order(long) == ["plain", "full"]
    [dropped] = long.dropped
    assert dropped.provider == "narrow"
    assert dropped.reason.startswith("its context window is 2000 tokens; the job needs about 50")


# --- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("used", "winner"), [(1_000_000, "free"), (1_000_001, "paid")])
def test_a_rule_on_day_tokens_used_reroutes_past_the_threshold(used: int, winner: str) -> None:
    cfg = config(
        provider("paid", "0.5"),
        provider("free", "2", free_tier={"tokens_per_day": 2_000_000}),
        rules=[
            {
                "name": "spare-free",
                "when": "provider.day_tokens_used > 1000000",
                "action": "deny",
                "providers": ["free"],
            }
        ],
    )
    decision = route(cfg, states={"free": ProviderState(day_tokens_used=used)})
    assert decision.chosen.provider.id == winner
    assert ("spare-free" in decision.matched_rules) is (winner == "paid")


def test_require_keeps_only_providers_that_satisfy_it() -> None:
    cfg = config(
        provider("us", "0.5"),
        provider("eu", "2", tags=["eu"]),
        rules=[
            {
                "name": "eu-only",
                "action": "require",
                "when": '!has(request.metadata.region) || "eu" in provider.tags',
            }
        ],
    )
    assert route(cfg).chosen.provider.id == "us"
    decision = route(cfg, job(metadata={"region": "eu"}))
    assert order(decision) == ["eu"]
    assert decision.dropped == [Dropped("us", "up", "rule 'eu-only' (require) not met")]


def test_prefer_wins_over_the_policy_order_and_avoid_goes_last() -> None:
    rules = [
        {"name": "like-dear", "when": 'provider.id == "dear"', "action": "prefer"},
        {"name": "shun-cheap", "when": 'provider.id == "cheap"', "action": "avoid"},
    ]
    decision = route(config(*THREE, default_policy="cheapest", rules=rules))
    assert order(decision) == ["dear", "mid", "cheap"]
    assert decision.reason == "preferred by rule 'like-dear'; cheapest of 3"
    assert decision.matched_rules == ["like-dear", "shun-cheap"]


def test_set_priority_sets_the_job_priority() -> None:
    cfg = config(
        *THREE,
        rules=[
            {
                "name": "urgent",
                "action": "set_priority",
                "value": 9,
                "when": "has(request.metadata.urgent)",
            }
        ],
    )
    assert route(cfg).priority is None
    decision = route(cfg, job(metadata={"urgent": True}))
    assert decision.priority == 9 and decision.matched_rules == ["urgent"]


def test_rules_see_now_in_the_configured_timezone() -> None:
    cfg = config(
        provider("a", "0.5"),
        provider("b", "2"),
        timezone="Asia/Tokyo",
        rules=[{"name": "night-off", "when": "now.hour < 6", "action": "deny", "providers": ["a"]}],
    )
    assert route(cfg, now=datetime(2026, 1, 15, 20, 0, tzinfo=UTC)).chosen.provider.id == "b"
    assert route(cfg, now=datetime(2026, 1, 15, 22, 0, tzinfo=UTC)).chosen.provider.id == "a"


def test_a_rule_that_errors_is_reported_and_does_not_match() -> None:
    cfg = config(
        *THREE,
        rules=[{"name": "slow", "when": "provider.p50_latency_ms > 500.0", "action": "deny"}],
    )
    decision = route(cfg, states={"cheap": ProviderState(p50_latency_ms=900.0)})
    assert "cheap" not in order(decision)
    assert [e.split(":")[0] for e in decision.rule_errors] == ["mid/up", "dear/up"]


# --- requests, keys and task routes --------------------------------------------------------

ROUTED = {
    "providers": [
        provider("coder", "3") | {"models": {"code-x": {"input": 3, "output": 3}}},
        provider("writer", "1") | {"models": {"prose-y": {"input": 1, "output": 1}}},
        provider("chatty", "0.1", task_types=["chat"])
        | {"models": {"prose-y": {"input": "0.1", "output": "0.1"}}},
    ],
    "models": {
        "code": [{"provider": "coder", "model": "code-x"}],
        "prose": [
            {"provider": "writer", "model": "prose-y"},
            {"provider": "chatty", "model": "prose-y"},
        ],
    },
    "default_model": "prose",
    "routes": {"coding": {"models": ["code", "prose"], "policy": "cheapest"}, "chat": ["prose"]},
}


def routed(**changes: Any) -> Config:
    return parse_config(json.dumps(ROUTED | changes))


def test_a_task_type_goes_to_its_routes_models_under_its_policy() -> None:
    decision = route(routed(), job(model=None, task_type="coding"))
    assert decision.policy == "cheapest"
    assert [(c.provider.id, c.public_model) for c in [decision.chosen, *decision.alternatives]] == [
        ("writer", "prose"),
        ("coder", "code"),
    ]
    assert decision.dropped == [
        Dropped("chatty", "prose-y", "serves task types chat only", lasting=True)
    ]
    chat = route(routed(), job(model=None, task_type="chat"))
    assert chat.policy == "free_first" and order(chat) == ["chatty", "writer"]


def test_an_explicit_model_overrides_the_task_type() -> None:
    decision = route(routed(), job(model="code", task_type="chat"))
    assert order(decision) == ["coder"] and decision.policy == "free_first"


def test_no_model_nor_task_type_uses_the_default_model() -> None:
    assert route(routed(), job(model=None)).chosen.public_model == "prose"


def test_unknown_models_and_task_types_name_what_is_available() -> None:
    assert unavailable(routed(), job(model="gpt-9")) == (
        "unknown model 'gpt-9'; available: code, prose, code-x, prose-y"
    )
    assert unavailable(routed(), job(model=None, task_type="poetry")) == (
        "no route for task_type 'poetry'; known task types: coding, chat"
    )


def key(*scopes: str) -> KeyConfig:
    return KeyConfig(id="k1", key_sha256=KEY_HASH, scopes=list(scopes), tags=["batch"])


def forbidden(cfg: Config, the_job: CompletionJob, **kwargs: Any) -> str:
    with pytest.raises(Forbidden) as caught:
        route(cfg, the_job, **kwargs)
    assert caught.value.http_status == 403
    return caught.value.message


def test_a_key_may_use_only_the_models_its_scopes_allow() -> None:
    cfg = routed()
    assert route(cfg, job(model="code"), key=key("c*")).chosen.public_model == "code"
    assert forbidden(cfg, job(model="prose"), key=key("c*")) == (
        "key 'k1' may not use model 'prose' (its scopes: c*)"
    )
    coding = route(cfg, job(model=None, task_type="coding"), key=key("code"))
    assert order(coding) == ["coder"]  # the route's other model is out of scope
    assert forbidden(cfg, job(model=None), key=key("code")) == (
        "key 'k1' may not use any of prose (its scopes: code)"
    )


def test_rules_see_the_key() -> None:
    cfg = config(
        *THREE,
        rules=[
            {
                "name": "batch-cheap",
                "action": "require",
                "when": '!("batch" in key.tags) || provider.id == "cheap"',
            }
        ],
    )
    assert order(route(cfg, key=key("*"))) == ["cheap"]
    assert len(order(route(cfg))) == 3


# --- reservation ---------------------------------------------------------------------------


def test_when_the_first_cannot_reserve_the_next_is_chosen_and_the_rest_kept() -> None:
    asked: list[str] = []

    def can_reserve(candidate: Candidate) -> bool:
        asked.append(candidate.provider.id)
        return candidate.provider.id != "cheap"

    decision = route(config(*THREE, default_policy="cheapest"), can_reserve=can_reserve)
    assert asked == ["cheap", "mid"]  # stops at the first reservation
    assert decision.chosen.provider.id == "mid"
    assert [c.provider.id for c in decision.alternatives] == ["dear"]
    assert decision.dropped == [Dropped("cheap", "up", "quota cannot be reserved")]
    assert decision.reason == "cheapest of 3; 1 skipped: quota cannot be reserved"


def test_no_quota_anywhere_is_unavailable_naming_quota() -> None:
    message = unavailable(config(*THREE), can_reserve=lambda candidate: False)
    assert message.count("quota cannot be reserved") == 3


# --- estimates and the record --------------------------------------------------------------


def test_estimates_use_the_provider_family_tools_and_output_defaults() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    the_job = job(params={"tools": tools})
    cfg = config(provider("claude", type="anthropic", spec={"max_tokens": 4096}), provider("gpt"))
    decision = route(cfg, the_job)
    by_id = {c.provider.id: c for c in [decision.chosen, *decision.alternatives]}
    for pid, family in (("claude", ProviderType.ANTHROPIC), ("gpt", ProviderType.OPENAI)):
        expected = estimate_prompt_tokens(the_job.messages, family, tools)
        assert by_id[pid].est_prompt_tokens == expected
    assert by_id["claude"].est_prompt_tokens > by_id["gpt"].est_prompt_tokens
    assert by_id["claude"].est_output_tokens == 4096
    assert by_id["gpt"].est_output_tokens == DEFAULT_OUTPUT_TOKENS
    assert route(cfg).chosen.est_output_tokens == 100  # the job's max_tokens wins


def test_the_decision_becomes_the_jobs_route() -> None:
    decision = route(config(*THREE, default_policy="cheapest"))
    assert decision.to_route(NOON).model_dump() == {
        "provider": "cheap",
        "model": "up",
        "public_model": "m",
        "reason": "cheapest of 3",
        "alternatives": ["mid", "dear"],
        "scheduled_at": NOON,
        "policy": "cheapest",
        "free": False,
        "reservation_id": None,
        "quota_epoch": None,
        "key_id": None,
        "output_cap": None,  # the job set a cap of its own
        "est_prompt_tokens": 14,
        "est_completion_tokens": 100,
        "deferred_from": None,  # set by the scheduler for a job that waited (deferral)
    }


def test_the_clock_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        route(config(*THREE), now=datetime(2026, 1, 15, 12, 0))

"""The providers file: validation errors name the file, the path and the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from broker.core.config import load_config, parse_config
from broker.core.errors import ConfigError, ModelUnavailable
from broker.core.pricing import call_cost, cost_usd

VALID = """
providers:
  - id: a
    type: openai
    base_url: http://127.0.0.1:1/v1
    models: {m1: {input: 1, output: 2}, m2: {input: 0.5, output: 0.5}}
  - id: b
    type: openai_compatible
    base_url: http://127.0.0.1:2/v1
    models: {upstream-m1: {input: 0.1, output: 0.1}}
models:
  public-m1: [a, {provider: b, model: upstream-m1}]
default_model: public-m1
"""


def test_the_example_config_loads() -> None:
    config = load_config(Path(__file__).parent.parent / "ops" / "config.example.yaml")
    assert {p.type.value for p in config.providers} == {
        "openai",
        "anthropic",
        "gemini",
        "openai_compatible",
    }
    assert config.default_model == "gpt-4o-mini"
    assert set(config.routes) == {"chat", "coding", "writing"}
    assert len(config.compiled_rules) == 2
    gemini = config.provider("gemini")
    assert gemini is not None and gemini.free_tier is not None
    llama = config.price("local-vllm", "meta-llama/Llama-3.1-8B-Instruct")
    assert llama.discounts[0].timezone == "Europe/Paris"


def test_a_target_must_be_served_by_its_provider() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(VALID, "providers.yaml")
    assert "providers.yaml: invalid config" in caught.value.message
    assert "models.public-m1: provider 'a' has no model 'public-m1'" in caught.value.message


def _one_provider(**changes: object) -> str:
    provider = {"id": "a", "type": "openai", "base_url": "http://x/v1", "models": {"m": PRICE}}
    return json.dumps({"providers": [{**provider, **changes}]})


PRICE = {"input": 1, "output": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("providers: []", "providers: List should have at least 1 item"),
        (_one_provider(base_url="nope"), "providers.0.base_url: Input should be a valid URL"),
        (
            _one_provider(type="claude"),
            "providers.0.type: Input should be 'openai', 'anthropic', 'gemini', "
            "'openai_compatible' or 'mock'",
        ),
        (
            _one_provider(models={"m": {"input": -1, "output": 1}}),
            "providers.0.models.m.input: Input should be greater than or equal to 0",
        ),
        (_one_provider(colour="red"), "providers.0.colour: Extra inputs are not permitted"),
        (_one_provider(concurrency=0), "providers.0.concurrency: Input should be greater than"),
        ("- just a list", "the top level must be a mapping"),
        ("providers: [unclosed", "not valid YAML or JSON"),
    ],
)
def test_an_invalid_file_is_refused_with_the_path_and_reason(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bad.yaml")
    assert caught.value.message.startswith("bad.yaml: ")
    assert expected in caught.value.message


def test_an_alerts_webhook_needs_a_secret_to_sign_with() -> None:
    alerts = {"alerts": {"webhook": "https://hooks.example/alerts"}}
    text = json.dumps({**json.loads(_one_provider()), **alerts})
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bad.yaml")
    assert "alerts.webhook: no webhooks.secret" in caught.value.message
    signed = {**json.loads(text), "webhooks": {"secret": "whsec_" + "A" * 32}}
    assert str(parse_config(json.dumps(signed), "ok.yaml").alerts.webhook).endswith("/alerts")


def test_json_is_accepted_too() -> None:
    text = (
        '{"providers": [{"id": "a", "type": "mock", "base_url": "http://x/v1",'
        ' "models": {"m": {"input": 1, "output": 1}}}]}'
    )
    assert parse_config(text).providers[0].id == "a"


def test_environment_references_are_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "providers: [{id: a, type: mock, base_url: '${SY_TEST_URL:-http://default/v1}',"
        " models: {m: {input: 1, output: 1}}}]"
    )
    assert str(parse_config(text).providers[0].base_url) == "http://default/v1"
    monkeypatch.setenv("SY_TEST_URL", "http://from-env:9/v1")
    assert str(parse_config(text).providers[0].base_url) == "http://from-env:9/v1"
    with pytest.raises(ConfigError, match=r"\$\{SY_MISSING\} is not set"):
        parse_config(text.replace("SY_TEST_URL:-http://default/v1", "SY_MISSING"), "x.yaml")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_unknown_model_names_what_is_available() -> None:
    config = parse_config(
        VALID.replace("public-m1: [a, ", "public-m1: [{provider: a, model: m1}, ")
    )
    with pytest.raises(ModelUnavailable) as caught:
        config.candidates("gpt-9")
    assert (
        caught.value.message == "unknown model 'gpt-9'; available: public-m1, m1, m2, upstream-m1"
    )
    assert [(p.id, m) for p, m in config.candidates("public-m1")] == [
        ("a", "m1"),
        ("b", "upstream-m1"),
    ]
    assert [(p.id, m) for p, m in config.candidates("m2")] == [("a", "m2")]


def test_cost_is_exact_to_the_nano_dollar() -> None:
    config = parse_config(
        VALID.replace("public-m1: [a, ", "public-m1: [{provider: a, model: m1}, ")
    )
    price = config.price("a", "m1")
    assert cost_usd(price, 1234, 567) == Decimal("0.002368000")  # 1234 * 1/M + 567 * 2/M
    assert cost_usd(config.price("b", "upstream-m1"), 1, 0) == Decimal("0.000000100")


# --- time zones, discounts, free tiers, routes, keys, rules --------------------------------

HASH_A = "a" * 64
HASH_B = "b" * 64


def _full(**top: object) -> str:
    """Two providers; public models `m` (both) and `n` (b only); `top` overrides the rest."""
    providers = [
        {"id": "a", "type": "openai", "base_url": "http://x/v1", "models": {"m": PRICE}},
        {"id": "b", "type": "mock", "base_url": "http://x/v1", "models": {"m": PRICE, "n": PRICE}},
    ]
    return json.dumps({"providers": providers, **top}, default=str)


def _discount(**changes: object) -> str:
    window = {"start": "22:00", "end": "06:00", "multiplier": "0.5", **changes}
    return _one_provider(models={"m": {**PRICE, "discounts": [window]}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_full(timezone="Mars/Olympus"), "timezone: Value error, unknown time zone 'Mars/Olympus'"),
        (_discount(timezone="CET+1"), "providers.0.models.m.discounts.0.timezone: Value error"),
        (
            _one_provider(free_tier={"requests_per_day": 5, "reset": {"timezone": "Nowhere"}}),
            "providers.0.free_tier.reset.timezone: Value error, unknown time zone 'Nowhere'",
        ),
        (
            _one_provider(free_tier={"requests_per_day": 5, "reset": {"hour": 24}}),
            "providers.0.free_tier.reset.hour: Input should be less than or equal to 23",
        ),
        (_one_provider(free_tier={}), "providers.0.free_tier: Value error, a free tier needs"),
        (_discount(multiplier="0"), "discounts.0.multiplier: Input should be greater than 0"),
        (_discount(multiplier="1.5"), "discounts.0.multiplier: Input should be less than or equal"),
        (_discount(start="24:00"), "discounts.0.start: Value error, '24:00' is not a time of day"),
        (_discount(end="6:00"), "discounts.0.end: Value error, '6:00' is not a time of day"),
        (_discount(start="12:60"), "discounts.0.start: Value error, '12:60' is not a time of day"),
        (
            _discount(weekdays=[7]),
            "discounts.0.weekdays.0: Input should be less than or equal to 6",
        ),
        (_one_provider(weight=0), "providers.0.weight: Input should be greater than 0"),
        (_full(default_policy="random"), "default_policy: Input should be 'free_first', "),
        (
            _full(routes={"coding": {"models": ["m", "gpt-9"]}}),
            "routes.coding.models: unknown model 'gpt-9'; available: m, n",
        ),
        (_full(routes={"coding": {"models": []}}), "routes.coding.models: List should have at"),
        (
            _full(keys=[{"id": "k", "key_sha256": HASH_A}, {"id": "k", "key_sha256": HASH_B}]),
            "keys.1 (k): duplicate id (see keys.0)",
        ),
        (
            _full(keys=[{"id": "k1", "key_sha256": HASH_A}, {"id": "k2", "key_sha256": HASH_A}]),
            "keys.1 (k2): same key_sha256 as keys.0",
        ),
        (
            _full(keys=[{"id": "k", "key_sha256": "sk-live-plain-key"}]),
            "keys.0.key_sha256: Value error, must be the SHA-256 of the key as 64 hex characters",
        ),
        (_full(keys=[{"id": "k", "key_sha256": "a" * 63}]), "keys.0.key_sha256: Value error"),
        (
            _full(
                consumers={"search": {}},
                keys=[{"id": "k", "key_sha256": HASH_A, "consumer": "ads"}],
            ),
            "keys.0 (k).consumer: unknown consumer 'ads'; known: search",
        ),
        (
            _full(keys=[{"id": "k", "key_sha256": HASH_A, "scopes": ["m", "gpt-4"]}]),
            "keys.0 (k).scopes: not a known model: 'gpt-4'",
        ),
        (
            _full(consumers={"c": {"budgets": {"usd_per_day": "-1"}}}),
            "consumers.c.budgets.usd_per_day: Input should be greater than or equal to 0",
        ),
        (
            _full(rules=[{"name": "r", "when": "true", "action": "deny", "providers": ["z"]}]),
            "rules.0 (r).providers: unknown provider 'z'",
        ),
        (_full(alerts={"thresholds": [0.8, 1.2]}), "alerts.thresholds.1: Input should be less"),
    ],
)
def test_new_sections_are_refused_with_the_path_and_reason(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bad.yaml")
    assert caught.value.message.startswith("bad.yaml: invalid config")
    assert expected in caught.value.message


def test_a_broken_rule_refuses_the_file_with_its_position() -> None:
    rules = [
        {"name": "fine", "when": "provider.free", "action": "prefer"},
        {"name": "typo", "when": "provider.day_token_used > 5", "action": "deny"},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(_full(rules=rules), "bad.yaml")
    message = caught.value.message
    assert message.startswith("bad.yaml: invalid config")
    assert "rules.1 (typo): invalid `when` expression 'provider.day_token_used > 5'" in message
    assert "1:9: " in message and "    | provider.day_token_used > 5" in message


def test_the_full_schema_loads_from_yaml() -> None:
    text = """
timezone: Europe/Paris
default_policy: cheapest
providers:
  - id: a
    type: gemini
    base_url: http://x/v1beta
    rpm: 60
    tpm: 100000
    weight: 2.5
    priority: 1
    tags: [free-tier, eu]
    task_types: [chat]
    free_tier:
      requests_per_day: 250
      tokens_per_minute: 250000
      reset: {timezone: America/Los_Angeles}
    models:
      m:
        input: 1
        output: 2
        rpm: 10
        discounts:
          - {start: "22:00", end: "06:00", weekdays: [4, 5], multiplier: 0.5}
          - {start: "00:00", end: "00:00", timezone: Asia/Tokyo, weekdays: [6], multiplier: 0.25}
routes:
  chat: [m]
  coding: {models: [m], policy: fastest}
consumers:
  search: {budgets: {usd_per_month: 200, tokens_per_day: 5000000}}
keys:
  - id: batch
    key_sha256: 9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08
    consumer: search
    tags: [batch]
    scopes: ["m*"]
    rpm: 600
    budgets: {usd_per_day: 5.5}
rules:
  - {name: spare-free, when: provider.day_tokens_used > 1000000, action: avoid, priority: 2}
alerts: {thresholds: [0.5, 0.9]}
"""
    config = parse_config(text, "full.yaml")
    provider = config.providers[0]
    assert provider.free_tier is not None and provider.free_tier.reset.hour == 0
    assert config.routes["chat"].models == ["m"] and config.routes["chat"].policy is None
    key = config.keys[0]
    assert key.key_sha256 == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert config.key_for_secret("test") is key and config.key_for_secret("nope") is None
    assert config.key("batch") is key and key.allows("m") and not key.allows("x")
    assert key.budgets is not None and key.budgets.usd_per_day == Decimal("5.5")
    assert [r.name for r in config.compiled_rules.rules] == ["spare-free"]
    # The digest is of the data only, and the same for the same file.
    assert "compiled_rules" not in config.model_dump()
    assert config.version == parse_config(text).version


def test_the_price_in_force_is_the_lowest_window_at_the_time() -> None:
    windows = [
        {"start": "22:00", "end": "06:00", "weekdays": [4], "multiplier": "0.5"},  # Fri night
        {"start": "00:00", "end": "00:00", "weekdays": [5], "multiplier": "0.8"},  # all Saturday
        {"start": "09:00", "end": "10:00", "timezone": "Asia/Tokyo", "multiplier": "0.9"},
    ]
    config = parse_config(
        _one_provider(models={"m": {**PRICE, "discounts": windows}})[:-1] + ', "timezone":'
        ' "America/New_York"}'
    )

    price = config.price("a", "m")

    def multiplier(at: datetime) -> Decimal:
        factor = price.multiplier_at(at, config.zone)
        # The one price function applies it: 1M input tokens at 1 USD, times the factor.
        assert call_cost(price, config.zone, at, 1_000_000, 0) == (price.input * factor).quantize(
            Decimal("0.000000001")
        )
        return factor

    ny = ZoneInfo("America/New_York")
    assert multiplier(datetime(2026, 1, 16, 23, 0, tzinfo=ny)) == Decimal("0.5")  # Fri 23:00
    assert multiplier(datetime(2026, 1, 17, 2, 0, tzinfo=ny)) == Decimal("0.5")  # Sat 02:00
    assert multiplier(datetime(2026, 1, 17, 7, 0, tzinfo=ny)) == Decimal("0.8")  # Sat 07:00
    assert multiplier(datetime(2026, 1, 16, 2, 0, tzinfo=ny)) == 1  # Fri 02:00: Thursday's
    assert multiplier(datetime(2026, 1, 17, 23, 59, tzinfo=ny)) == Decimal("0.8")  # Sat 23:59
    assert multiplier(datetime(2026, 1, 18, 0, 0, tzinfo=ny)) == 1  # Sunday: the day is over
    assert multiplier(datetime(2026, 1, 20, 0, 30, tzinfo=UTC)) == Decimal("0.9")  # 09:30 Tokyo
    discount = price.discount_at(datetime(2026, 1, 17, 2, 0, tzinfo=ny), config.zone)
    assert discount is not None and discount.describe(config.timezone) == (
        "0.5 until 06:00 America/New_York"
    )


def test_candidates_for_a_model_a_task_type_or_the_default() -> None:
    config = parse_config(
        _full(
            models={"both": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "n"}]},
            routes={"chat": {"models": ["both", "m"], "policy": "fastest"}, "coding": ["n"]},
            default_model="n",
            default_policy="cheapest",
        )
    )

    def ids(model: str | None = None, task_type: str | None = None) -> tuple[list[str], str]:
        found, policy = config.candidates_for(model=model, task_type=task_type)
        return [f"{s.provider.id}/{s.model}:{s.public_model}" for s in found], policy

    assert ids("m") == (["a/m:m", "b/m:m"], "cheapest")
    assert ids("m", task_type="chat") == (["a/m:m", "b/m:m"], "cheapest")  # the model wins
    assert ids(task_type="chat") == (["a/m:both", "b/n:both", "b/m:m"], "fastest")
    assert ids(task_type="coding") == (["b/n:n"], "cheapest")  # the route inherits the default
    assert ids() == (["b/n:n"], "cheapest")
    with pytest.raises(
        ModelUnavailable, match="no route for task_type 'poetry'; known task types: chat, coding"
    ):
        config.candidates_for(task_type="poetry")
    with pytest.raises(ModelUnavailable, match="no default_model is set"):
        parse_config(_full()).candidates_for()


def test_a_key_consumer_is_free_text_when_no_consumers_are_configured() -> None:
    config = parse_config(_full(keys=[{"id": "k", "key_sha256": HASH_A, "consumer": "ads"}]))
    assert config.keys[0].consumer == "ads" and config.keys[0].scopes == ["*"]

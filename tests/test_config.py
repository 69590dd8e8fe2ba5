"""The providers file: validation errors name the file, the path and the reason."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from broker.config import load_config, parse_config
from broker.errors import ConfigError, ModelUnavailable
from broker.pricing import cost_usd

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

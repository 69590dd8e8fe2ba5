"""The providers file: providers, their models, prices and limits, public model names, task
routes, virtual keys and budgets, and routing rules (the smaller parts are in
``broker.core.limits`` and re-exported here).

YAML or JSON, validated by pydantic. Errors name the file, the path inside it and the reason;
a rule's CEL expression is compiled at load, so a broken rule refuses the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, model_validator

from broker.core.errors import ConfigError, ModelUnavailable
from broker.core.limits import (
    Alerts,
    Budgets,
    ConsumerConfig,
    Discount,
    FreeTier,
    KeyConfig,
    Policy,
    Reset,
    TaskRoute,
    TimeZoneName,
    zone,
)
from broker.core.rules import CompiledRules, Rule

__all__ = [
    "Alerts",
    "Budgets",
    "CircuitConfig",
    "Config",
    "ConsumerConfig",
    "Discount",
    "FreeTier",
    "KeyConfig",
    "ModelSpec",
    "ModelTarget",
    "Policy",
    "ProviderConfig",
    "ProviderType",
    "Reset",
    "Serving",
    "TaskRoute",
    "load_config",
    "parse_config",
]


class ProviderType(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    OPENAI_COMPATIBLE = "openai_compatible"
    MOCK = "mock"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of a provider: prices in USD per million tokens, and its defaults."""

    input: Decimal = Field(ge=0, description="USD per million prompt tokens.")
    output: Decimal = Field(ge=0, description="USD per million completion tokens.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Output cap sent when a job sets none (Anthropic requires one).",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute, this model.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute, this model.")
    discounts: list[Discount] = Field(
        default_factory=list, description="Off-peak windows; the lowest multiplier applies."
    )

    def discount_at(self, at: datetime, default_zone: ZoneInfo) -> Discount | None:
        """The window containing ``at`` with the lowest multiplier (the first among equals)."""
        active = [d for d in self.discounts if d.contains(at, default_zone)]
        return min(active, key=lambda d: d.multiplier) if active else None

    def multiplier_at(self, at: datetime, default_zone: ZoneInfo) -> Decimal:
        """The price factor in force at ``at``: the window's, 1 outside every window."""
        discount = self.discount_at(at, default_zone)
        return discount.multiplier if discount is not None else Decimal(1)


class CircuitConfig(_Strict):
    """When a provider's circuit breaker opens (``broker.state.circuits``)."""

    failures: int = Field(
        default=5, ge=1, description="Failed calls in a row (timeouts, 5xx) that open it."
    )
    open_s: float = Field(
        default=30.0, gt=0, description="How long it stays open before a call may try again."
    )


class ProviderConfig(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    type: ProviderType
    base_url: HttpUrl
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the provider key."
    )
    headers: dict[str, str] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(min_length=1)
    concurrency: int = Field(default=8, ge=1, le=10_000)
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    global_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight across all worker processes (Redis leases); "
        "`concurrency` is each process's own cap.",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute, all models.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute, all models.")
    weight: float = Field(default=1.0, gt=0, description="Share of jobs under `weighted`.")
    priority: int = Field(default=0, description="Order under `priority`: lower is tried first.")
    tags: list[str] = Field(default_factory=list)
    task_types: list[str] = Field(
        default_factory=list,
        description="If set, jobs routed by task type reach this provider only for these types.",
    )
    free_tier: FreeTier | None = None
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)

    def api_key(self) -> str | None:
        """The key from the environment, read at call time so a rotated key is picked up."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ModelTarget(_Strict):
    provider: str
    model: str | None = Field(default=None, description="The provider's name; default: same.")


class Serving(NamedTuple):
    """One way to serve a public model: a provider and its upstream model name."""

    provider: ProviderConfig
    model: str
    public_model: str


class Config(_Strict):
    timezone: TimeZoneName = Field(
        default="UTC", description="For discount windows, `now` in rules and budget periods."
    )
    providers: list[ProviderConfig] = Field(min_length=1)
    models: dict[str, list[ModelTarget]] = Field(default_factory=dict)
    default_model: str | None = None
    default_policy: Policy = "free_first"
    fair_lanes: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Queues per provider that share its workers fairly between consumers "
        "(broker/state/fairness.py); 1 turns fairness off.",
    )
    routes: dict[str, TaskRoute] = Field(
        default_factory=dict, description="Task type (coding, chat, ...) -> models and policy."
    )
    keys: list[KeyConfig] = Field(default_factory=list)
    consumers: dict[str, ConsumerConfig] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    alerts: Alerts = Field(default_factory=Alerts)

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        # `models: {gpt-4o-mini: [mock]}` is short for `[{provider: mock}]`.
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                name: [{"provider": t} if isinstance(t, str) else t for t in targets]
                if isinstance(targets, list)
                else targets
                for name, targets in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        ids = [p.id for p in self.providers]
        if len(ids) != len(set(ids)):
            raise ValueError(f"provider ids must be unique, got {ids}")
        for name, targets in self.models.items():
            if not targets:
                raise ValueError(f"models.{name}: needs at least one provider")
            for target in targets:
                provider = self.provider(target.provider)
                if provider is None:
                    raise ValueError(f"models.{name}: unknown provider {target.provider!r}")
                upstream = target.model or name
                if upstream not in provider.models:
                    raise ValueError(
                        f"models.{name}: provider {provider.id!r} has no model {upstream!r}"
                    )
        if self.default_model is not None and self.default_model not in self.public_models():
            raise ValueError(f"default_model {self.default_model!r} is not a known model")
        self._check_routes_and_keys()
        self._check_rules()
        return self

    def _check_routes_and_keys(self) -> None:
        public = self.public_models()
        for task_type, route in self.routes.items():
            for model in route.models:
                if model not in public:
                    raise ValueError(
                        f"routes.{task_type}.models: unknown model {model!r};"
                        f" available: {', '.join(public)}"
                    )
        key_ids: dict[str, int] = {}
        digests: dict[str, int] = {}
        for index, key in enumerate(self.keys):
            where = f"keys.{index} ({key.id})"
            if key.id in key_ids:
                raise ValueError(f"{where}: duplicate id (see keys.{key_ids[key.id]})")
            if key.key_sha256 in digests:
                raise ValueError(f"{where}: same key_sha256 as keys.{digests[key.key_sha256]}")
            key_ids[key.id] = digests[key.key_sha256] = index
            if self.consumers and key.consumer is not None and key.consumer not in self.consumers:
                raise ValueError(
                    f"{where}.consumer: unknown consumer {key.consumer!r};"
                    f" known: {', '.join(self.consumers)}"
                )
            unknown = key.unknown_scopes(public)
            if unknown:
                raise ValueError(
                    f"{where}.scopes: not a known model: {', '.join(map(repr, unknown))}"
                    " (use a pattern like 'claude-*' for families)"
                )

    def _check_rules(self) -> None:
        known = {p.id for p in self.providers}
        for index, rule in enumerate(self.rules):
            for provider_id in rule.providers or []:
                if provider_id not in known:
                    raise ValueError(
                        f"rules.{index} ({rule.name}).providers: unknown provider {provider_id!r}"
                    )
        try:
            _ = self.compiled_rules  # compiled here, once, and cached: a broken rule refuses
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @cached_property
    def compiled_rules(self) -> CompiledRules:
        """The rules, compiled at load (not part of the data: ``version`` ignores it)."""
        return CompiledRules.compile(self.rules)

    @cached_property
    def needs_quota(self) -> bool:
        """Whether any limit, budget or rule is set (rules read the providers' day counters);
        else neither the scheduler nor the accountant needs the quota store."""
        if self.keys or self.consumers or self.rules:
            return True
        return any(
            p.rpm or p.tpm or p.free_tier or any(m.rpm or m.tpm for m in p.models.values())
            for p in self.providers
        )

    @cached_property
    def keys_by_sha256(self) -> dict[str, KeyConfig]:
        return {key.key_sha256: key for key in self.keys}

    @property
    def zone(self) -> ZoneInfo:
        """The top-level ``timezone``."""
        return zone(self.timezone)

    def key(self, key_id: str) -> KeyConfig | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def key_for_secret(self, secret: str) -> KeyConfig | None:
        """The key whose SHA-256 matches the presented virtual key, if any."""
        return self.keys_by_sha256.get(hashlib.sha256(secret.encode()).hexdigest())

    def provider(self, provider_id: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.id == provider_id), None)

    def public_models(self) -> list[str]:
        """Names a job may ask for: the `models` map plus every provider's own model names."""
        names = dict.fromkeys(self.models)
        for p in self.providers:
            names.update(dict.fromkeys(p.models))
        return list(names)

    def candidates(self, public_model: str) -> list[tuple[ProviderConfig, str]]:
        """Providers serving ``public_model``, with their upstream model name, in config order."""
        if public_model in self.models:
            pairs = []
            for target in self.models[public_model]:
                provider = self.provider(target.provider)
                assert provider is not None  # checked at load
                pairs.append((provider, target.model or public_model))
            return pairs
        pairs = [(p, public_model) for p in self.providers if public_model in p.models]
        if not pairs:
            raise ModelUnavailable(
                f"unknown model {public_model!r}; available: {', '.join(self.public_models())}"
            )
        return pairs

    def resolve(self, model: str | None, task_type: str | None) -> tuple[list[str], Policy]:
        """The public models a job may go to, and the policy ordering their providers.

        An explicit ``model`` wins over ``task_type``; with neither, ``default_model``.
        """
        if model is not None:
            if model not in self.public_models():
                raise ModelUnavailable(
                    f"unknown model {model!r}; available: {', '.join(self.public_models())}"
                )
            return [model], self.default_policy
        if task_type is not None:
            route = self.routes.get(task_type)
            if route is None:
                known = ", ".join(self.routes) or "none (the config has no routes)"
                raise ModelUnavailable(
                    f"no route for task_type {task_type!r}; known task types: {known}"
                )
            return list(route.models), route.policy or self.default_policy
        if self.default_model is None:
            raise ModelUnavailable(
                "the job names no model nor task_type and no default_model is set;"
                f" available: {', '.join(self.public_models())}"
            )
        return [self.default_model], self.default_policy

    def candidates_for(
        self, model: str | None = None, task_type: str | None = None
    ) -> tuple[list[Serving], Policy]:
        """Every (provider, upstream model) for a job's model or task type, in config order
        (a route's models in turn, each pair once), and the policy to order them by."""
        public_models, policy = self.resolve(model, task_type)
        return self.serving(public_models), policy

    def serving(self, public_models: list[str]) -> list[Serving]:
        """The providers of each model in turn; a (provider, upstream) pair appears once."""
        seen: set[tuple[str, str]] = set()
        found: list[Serving] = []
        for public in public_models:
            for provider, upstream in self.candidates(public):
                if (provider.id, upstream) not in seen:
                    seen.add((provider.id, upstream))
                    found.append(Serving(provider, upstream, public))
        return found

    def price(self, provider_id: str, model: str) -> ModelSpec:
        provider = self.provider(provider_id)
        if provider is None or model not in provider.models:
            raise ConfigError(f"no price for provider {provider_id!r} model {model!r}")
        return provider.models[model]

    def discount_at(self, provider_id: str, model: str, at: datetime) -> Discount | None:
        """The discount window in force at ``at`` (aware), if any: the lowest multiplier."""
        return self.price(provider_id, model).discount_at(at, self.zone)

    def effective_price(
        self, provider_id: str, model: str, at: datetime
    ) -> tuple[ModelSpec, Decimal]:
        """The list prices and the multiplier in force at ``at`` (1 outside every window)."""
        price = self.price(provider_id, model)
        return price, price.multiplier_at(at, self.zone)

    @property
    def version(self) -> str:
        """A short digest of the content; stored with every usage row as its price version."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str, source: str) -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}`` with the environment's values, so one file
    serves several hosts (the compose network, this machine). Keys still go by ``api_key_env``."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{source}: ${{{name}}} is not set and has no default")
        return default

    return _ENV_REFERENCE.sub(value, text)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse YAML or JSON text (JSON is YAML), after ``${ENV}`` expansion, into a ``Config``."""
    try:
        data = yaml.safe_load(_expand_env(text, source))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_config(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(path))

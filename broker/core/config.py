"""The providers file: providers and their models, public model names, task routes, virtual
keys and budgets, and routing rules, as one validated ``Config`` (its parts are in
``broker.core.providers`` and ``broker.core.limits``, re-exported here).

YAML or JSON, validated by pydantic. Errors name the file, the path inside it and the reason;
a rule's CEL expression is compiled at load, so a broken rule refuses the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

import yaml
from pydantic import Field, ValidationError, model_validator

from broker.core.config_checks import check_references
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
from broker.core.providers import CircuitConfig, ModelSpec, ProviderConfig, ProviderType
from broker.core.rules import CompiledRules, Rule
from broker.core.strict import StrictModel
from broker.core.webhooks import WebhooksConfig

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
    "WebhooksConfig",
    "load_config",
    "parse_config",
]


class ModelTarget(StrictModel):
    provider: str
    model: str | None = Field(default=None, description="The provider's name; default: same.")


class Serving(NamedTuple):
    """One way to serve a public model: a provider and its upstream model name."""

    provider: ProviderConfig
    model: str
    public_model: str


class Config(StrictModel):
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
    quota_when_redis_away: Literal["wait", "admit"] = Field(
        default="wait",
        description="wait: no limit is ever overshot; a batch job waits for Redis, an RPC job "
        "is told to retry. admit: jobs run unmetered while Redis is away and are counted at "
        "their estimates when it returns, so a limit may be overshot by what ran meanwhile.",
    )
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)

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
        check_references(self)
        return self

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
            raise self._unknown_model(public_model)
        return pairs

    def _unknown_model(self, name: str) -> ModelUnavailable:
        return ModelUnavailable(
            f"unknown model {name!r}; available: {', '.join(self.public_models())}"
        )

    def resolve(self, model: str | None, task_type: str | None) -> tuple[list[str], Policy]:
        """The public models a job may go to, and the policy ordering their providers: an
        explicit ``model`` wins over ``task_type``; with neither, ``default_model``."""
        if model is not None:
            if model not in self.public_models():
                raise self._unknown_model(model)
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

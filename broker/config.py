"""The providers file: which providers exist, their models and prices, and public model names.

YAML or JSON, validated by pydantic. Errors name the file, the path inside it and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, model_validator

from broker.errors import ConfigError, ModelUnavailable

__all__ = [
    "Config",
    "ModelSpec",
    "ModelTarget",
    "ProviderConfig",
    "ProviderType",
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

    def api_key(self) -> str | None:
        """The key from the environment, read at call time so a rotated key is picked up."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ModelTarget(_Strict):
    provider: str
    model: str | None = Field(default=None, description="The provider's name; default: same.")


class Config(_Strict):
    providers: list[ProviderConfig] = Field(min_length=1)
    models: dict[str, list[ModelTarget]] = Field(default_factory=dict)
    default_model: str | None = None

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
        return self

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

"""Provider adapters: one module per wire format, all behind ``ProviderAdapter``."""

from __future__ import annotations

import httpx

from broker.core.config import ProviderConfig, ProviderType
from broker.core.errors import ConfigError
from workers.adapters.anthropic import AnthropicAdapter
from workers.adapters.base import ProviderAdapter, ProviderRequest
from workers.adapters.gemini import GeminiAdapter
from workers.adapters.openai import OpenAIAdapter

__all__ = ["ProviderAdapter", "ProviderRequest", "adapter_for"]

_ADAPTERS: dict[ProviderType, type[ProviderAdapter]] = {
    ProviderType.OPENAI: OpenAIAdapter,
    ProviderType.ANTHROPIC: AnthropicAdapter,
    ProviderType.GEMINI: GeminiAdapter,
    ProviderType.OPENAI_COMPATIBLE: OpenAIAdapter,
    ProviderType.MOCK: OpenAIAdapter,
}


def adapter_for(provider: ProviderConfig, http: httpx.AsyncClient) -> ProviderAdapter:
    """The adapter for the provider's type, over the shared HTTP client."""
    try:
        cls = _ADAPTERS[provider.type]
    except KeyError:
        raise ConfigError(
            f"provider {provider.id!r}: type {provider.type.value!r} has no adapter yet"
        ) from None
    return cls(provider, http)

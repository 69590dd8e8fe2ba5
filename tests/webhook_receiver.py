"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 (aiohttp) that checks every
request with the Standard Webhooks reference verifier (the ``standardwebhooks`` package) under
each secret it knows, and answers as planned per path (200 once a plan runs out)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import free_port

SLOW = "slow"
"""A planned answer: wait ``Receiver.slow_s`` before answering 200 (past the sender's timeout)."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified_by: list[str]
    """The secrets (of the receiver's) whose reference verification passed."""

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    secrets: list[str]
    slow_s: float = 2.0
    received: list[Received] = field(default_factory=list)
    plans: dict[str, list[int | str]] = field(default_factory=lambda: defaultdict(list))
    base_url: str = ""
    _runner: web.AppRunner | None = None

    def plan(self, path: str, *answers: int | str) -> str:
        """Answer ``path`` with these statuses (or ``SLOW``) in turn; returns its URL."""
        self.plans[path] = list(answers)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            verified.append(secret)
        self.received.append(Received(request.path, headers, body, verified))
        plan = self.plans.get(request.path)
        answer = plan.pop(0) if plan else 200
        if answer == SLOW:
            await asyncio.sleep(self.slow_s)
            answer = 200
        assert isinstance(answer, int)
        return web.Response(status=answer, text="ok")


@asynccontextmanager
async def receiving(*secrets: str) -> AsyncIterator[Receiver]:
    """A receiver knowing ``secrets``, listening for the block's length."""
    server = await Receiver(list(secrets)).start()
    try:
        yield server
    finally:
        await server.stop()

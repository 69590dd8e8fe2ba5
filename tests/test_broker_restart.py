"""RabbitMQ restarted under a running pipeline (``rabbitmqctl stop_app`` / ``start_app``): a
client made before it keeps working. The broker is always started again, even when the test
fails."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.core.config import load_config
from broker.core.errors import Unavailable
from broker.core.names import Names
from schemas import JobStatus
from tests.conftest import AMQP_URL, MockProvider

MESSAGES = [{"role": "user", "content": "still there?"}]


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
async def broker_restart(amqp: AbstractRobustConnection) -> AsyncIterator[list[str]]:
    """A list to append "stopped" to once the test stops the app; started again at the end,
    and the session's connection (the fixtures clean up through it) back before teardown."""
    if urlsplit(AMQP_URL).hostname not in ("127.0.0.1", "localhost") or not shutil.which(
        "rabbitmqctl"
    ):
        pytest.skip("stops and starts the local RabbitMQ app: needs rabbitmqctl")
    stopped: list[str] = []
    try:
        yield stopped
    finally:
        if stopped:
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            await asyncio.to_thread(_rabbitmqctl, "await_startup")
        await asyncio.wait_for(amqp.connected.wait(), 30)


async def test_a_client_made_before_a_broker_restart_keeps_working(
    names: Names,
    config_file: Path,
    pipeline: Any,
    mock: MockProvider,
    broker_restart: list[str],
) -> None:
    async with pipeline(load_config(config_file)):
        client = await SwitchyardClient.connect(
            f"{AMQP_URL}?reconnect_interval=0.5", namespace=names.namespace
        )
        async with client:
            before = await client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=30)
            assert before.status is JobStatus.SUCCEEDED

            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            broker_restart.append("stopped")
            # While the broker is away a call fails at once, typed and retryable.
            with pytest.raises(Unavailable) as away:
                await client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=10)
            assert away.value.retry_after is not None and away.value.retry_after > 0
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            await asyncio.to_thread(_rabbitmqctl, "await_startup")
            broker_restart.clear()

            # The client reconnects on its own; then every call is answered again.
            deadline = time.monotonic() + 60
            while True:
                try:
                    again = await client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=10)
                    break
                except (Unavailable, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            assert again.status is JobStatus.SUCCEEDED
            results = await asyncio.gather(
                *(client.complete(MESSAGES, model="gpt-4o-mini", timeout_s=30) for _ in range(20))
            )
            assert [r.status for r in results] == [JobStatus.SUCCEEDED] * 20

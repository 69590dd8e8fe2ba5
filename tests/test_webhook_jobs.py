"""Webhooks end to end, through the real pipeline and the dispatcher, to a receiver that checks
every request with the Standard Webhooks reference verifier: a job sent over AMQP, over HTTP
(``POST /v1/jobs``) and as a batch line gets its result POSTed, signed; a batch's end is POSTed
as ``batch.completed``; a webhook at 127.0.0.1 is refused when the job is submitted (a typed
error naming it, nothing POSTed) unless ``webhooks.allow`` lists it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import AsyncOpenAI

from broker.client import SwitchyardClient
from broker.client.client import make_job
from broker.core.config import Config, load_config
from broker.core.names import Names
from broker.transport.webhooks import job_webhook_id
from broker.webhooks.dispatcher import WebhookDispatcher
from mock_provider import expected_completion
from schemas import ReplyTo
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config
from tests.webhook_receiver import Receiver, new_secret, receiving

SECRET = new_secret()
KEY = "sk-webhook-jobs"


def hooks_config(tmp_path: Path, mock: MockProvider, names: Names, allow: list[str]) -> Config:
    providers = [{"id": "one", "concurrency": 8, "models": {"m": {"input": 2, "output": 8}}}]
    key = {"id": f"hooks-{names.namespace}", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    webhooks = {"secret": SECRET, "allow": allow, "retry_schedule_s": [0.2], "jitter": 0}
    path = write_config(tmp_path / "hooks.yaml", mock, providers, keys=[key], webhooks=webhooks)
    return load_config(path)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(SECRET) as server:
        yield server


@pytest.fixture
def running(gateway_in_front: Any, names: Names, database_url: str) -> Any:
    """``async with running(config) as url``: the pipeline, a gateway and a dispatcher."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run(config: Config) -> AsyncIterator[str]:
        dispatcher = WebhookDispatcher(AMQP_URL, config, names, database_url=database_url)
        async with gateway_in_front(config) as url:
            await dispatcher.start()
            try:
                yield url
            finally:
                await dispatcher.stop(grace_s=2)

    return run


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_results_of_amqp_http_and_batch_jobs_reach_their_webhooks_signed(
    running: Any, receiver: Receiver, names: Names, mock: MockProvider, tmp_path: Path
) -> None:
    config = hooks_config(tmp_path, mock, names, ["127.0.0.1"])
    async with running(config) as url:
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        try:
            job = make_job(ask("over amqp"), model="m").model_copy(
                update={"reply": ReplyTo(webhook=receiver.url("/amqp"))}
            )
            await client.submit(job, results_queue=await client.open_results("hooks"), api_key=KEY)
        finally:
            await client.close()
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {KEY}"}
        ) as http:
            posted = await http.post(
                "/v1/jobs",
                json={"model": "m", "messages": ask("over http"), "webhook": receiver.url("/http")},
            )
            assert posted.status_code == 202, posted.text
        sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        line = {"model": "m", "messages": ask("a batch line"), "webhook": receiver.url("/line")}
        entry = {"custom_id": "only", "method": "POST", "url": "/v1/chat/completions", "body": line}
        (tmp_path / "in.jsonl").write_bytes(orjson.dumps(entry))
        uploaded = await sdk.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"webhook": receiver.url("/batch")},
        )

        async def all_came() -> bool:
            return all(receiver.at(p) for p in ("/amqp", "/http", "/line", "/batch"))

        await eventually(all_came, 30, "every webhook to arrive")
        await sdk.close()

    for path, text in (("/amqp", "over amqp"), ("/http", "over http"), ("/line", "a batch line")):
        (got,) = receiver.at(path)
        assert got.verified_by == [SECRET]
        assert got.payload["type"] == "job.succeeded"
        answer = got.payload["data"]["response"]["choices"][0]["message"]["content"]
        assert (answer, "stop") == expected_completion(ask(text))
    assert receiver.at("/amqp")[0].payload["data"]["job_id"] == job.job_id
    # A batch line's result goes under its line's id, whichever job id (send round) answered it.
    assert receiver.at("/line")[0].webhook_id == job_webhook_id(f"{batch.id}:1")
    (ended,) = receiver.at("/batch")
    assert ended.verified_by == [SECRET] and ended.payload["type"] == "batch.completed"
    assert ended.payload["data"]["id"] == batch.id
    assert ended.payload["data"]["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


async def test_a_webhook_at_loopback_is_refused_at_submission_unless_allowed(
    running: Any, receiver: Receiver, names: Names, mock: MockProvider, tmp_path: Path
) -> None:
    config = hooks_config(tmp_path, mock, names, [])
    async with running(config) as url:
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        try:
            job = make_job(ask("refused"), model="m").model_copy(
                update={"reply": ReplyTo(webhook=receiver.url("/amqp"))}
            )
            queue = await client.open_results("refused")
            await client.submit(job, results_queue=queue, api_key=KEY)
            result = await anext(client.results(queue))
        finally:
            await client.close()
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {KEY}"}
        ) as http:
            posted = await http.post(
                "/v1/jobs",
                json={"model": "m", "messages": ask("refused"), "webhook": receiver.url("/http")},
            )
    assert result.status.value == "rejected" and result.error is not None
    assert result.error.code.value == "invalid_message"
    assert (
        result.error.message.startswith("reply.webhook: ") and "127.0.0.1" in result.error.message
    )
    assert posted.status_code == 400, posted.text
    error = posted.json()["error"]
    assert error["code"] == "invalid_message" and "loopback" in error["message"]
    assert mock.stats()["calls"] == 0 and receiver.received == []

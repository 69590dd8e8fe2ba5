"""The webhook dispatcher against the real RabbitMQ and Postgres and a real HTTP receiver that
checks every request with the Standard Webhooks reference verifier (``standardwebhooks``).

Done when: the receiver gets every result, signed; after it answers 500 three times it still
gets the result once it recovers, with the same ``webhook-id``; 127.0.0.1 is refused unless
allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from standardwebhooks import Webhook

from broker.core import names as n
from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.db import make_engine
from broker.core.errors import InvalidMessage
from broker.core.names import Names
from broker.core.webhook_store import WebhookStore
from broker.core.webhook_urls import (
    UnresolvableHost,
    address_refusal,
    check_webhook,
    check_webhook_url,
)
from broker.core.webhooks import sign, webhook_body
from broker.transport.amqp import Publisher
from broker.transport.webhooks import (
    batch_webhook_id,
    decode_webhook,
    job_webhook_id,
    publish_webhook,
)
from broker.webhooks.dispatcher import WebhookDispatcher
from schemas import WebhookRequest
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    REPO,
    delete_queues,
    eventually,
    free_port,
    process_env,
    queue_depth,
)
from tests.webhook_receiver import SLOW, Receiver, new_secret, receiving

SECRET = new_secret()
WAIT_S = 15.0

Dispatching = Callable[[Config], AbstractAsyncContextManager[WebhookDispatcher]]


def hooks_config(*, keys: list[dict[str, str]] | None = None, **webhooks: Any) -> Config:
    """A config whose webhooks are signed with ``SECRET``, may reach 127.0.0.1 and retry three
    times 0.2 s apart (``webhooks`` overrides any of it)."""
    section = {
        "secret": SECRET,
        "allow": ["127.0.0.1"],
        "retry_schedule_s": [0.2, 0.2, 0.2],
        "jitter": 0,
        "timeout_s": 2,
        **webhooks,
    }
    provider = {
        "id": "hooks",
        "type": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "models": {"m": {"input": 1, "output": 1}},
    }
    top = {"providers": [provider], "webhooks": section, "keys": keys or []}
    return Config.model_validate(top)


def event(url: str, *, owner: str | None = None, webhook_id: str | None = None) -> WebhookRequest:
    job_id = f"job-{secrets.token_hex(8)}"
    return WebhookRequest(
        webhook_id=webhook_id or job_webhook_id(job_id),
        url=url,  # type: ignore[arg-type]
        type="job.succeeded",
        data={"job_id": job_id, "status": "succeeded", "text": "an answer"},
        owner=owner,
        occurred_at=utcnow(),
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(SECRET) as server:
        yield server


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[WebhookStore]:
    engine = make_engine(database_url)
    try:
        yield WebhookStore(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def publisher(amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    channel = await amqp.channel(publisher_confirms=True)
    try:
        yield Publisher(channel)
    finally:
        await channel.close()


@pytest.fixture
async def dispatching(
    names: Names, database_url: str, amqp: AbstractRobustConnection
) -> AsyncIterator[Dispatching]:
    """``async with dispatching(config) as d``: a dispatcher in this event loop."""

    @asynccontextmanager
    async def run(config: Config) -> AsyncIterator[WebhookDispatcher]:
        service = WebhookDispatcher(AMQP_URL, config, names, database_url=database_url)
        await service.start()
        try:
            yield service
        finally:
            await service.stop(grace_s=2)

    yield run
    await delete_queues(amqp, names.webhooks, names.control)


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    await eventually(predicate, WAIT_S, what)


async def state_of(store: WebhookStore, webhook_id: str) -> str | None:
    row = await store.get(webhook_id)
    return None if row is None else str(row["state"])


async def reaches(store: WebhookStore, webhook_id: str, state: str) -> dict[str, Any]:
    async def there() -> bool:
        return await state_of(store, webhook_id) == state

    await until(there, f"webhook {webhook_id} {state}")
    row = await store.get(webhook_id)
    assert row is not None
    return row


async def dead_letters(
    amqp: AbstractRobustConnection, names: Names, count: int
) -> list[AbstractIncomingMessage]:
    async def enough() -> bool:
        return await queue_depth(amqp, names.dead) >= count

    await until(enough, f"{count} dead letters")
    channel = await amqp.channel()
    queue = await channel.declare_queue(names.dead, passive=True)
    found = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        found.append(message)
    await channel.close()
    return found


# --- signing and ids --------------------------------------------------------------------------


def test_the_signature_passes_the_reference_verifier_under_each_secret() -> None:
    first, second = new_secret(), new_secret()
    body = webhook_body(event("https://hooks.example.com/x"))
    timestamp = int(utcnow().timestamp())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([first, second], "msg_1", timestamp, body),
    }
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (first, second):
        assert Webhook(secret).verify(body, headers)["type"] == "job.succeeded"
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_webhook_ids_are_derived_from_what_they_report() -> None:
    assert job_webhook_id("job-1") == job_webhook_id("job-1") != job_webhook_id("job-2")
    assert batch_webhook_id("b1", "completed") != batch_webhook_id("b1", "failed")
    assert job_webhook_id("b1") != batch_webhook_id("b1", "")
    assert job_webhook_id("x").startswith("msg_") and len(job_webhook_id("x")) == 36


def test_an_event_is_decoded_or_refused_by_its_fields() -> None:
    request = event("https://hooks.example.com/x")
    assert decode_webhook(request.model_dump_json().encode()) == request
    with pytest.raises(InvalidMessage, match="url"):
        decode_webhook(request.model_dump_json().replace("https://", "nope").encode())


# --- the SSRF guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "special-purpose (not public)"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_the_guard_refuses_what_is_not_public(address: str, kind: str) -> None:
    assert address_refusal(address, []) == kind


def test_the_guard_passes_public_addresses() -> None:
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert address_refusal(address, []) is None


def test_allow_lets_hosts_and_cidrs_through_and_metadata_only_when_exact() -> None:
    assert address_refusal("10.1.2.3", ["10.0.0.0/8"]) is None
    assert address_refusal("10.1.2.3", ["192.168.0.0/16"]) == "private"
    assert address_refusal("127.0.0.1", ["127.0.0.1"]) is None
    assert address_refusal("::1", ["::1/128"]) is None
    assert address_refusal("169.254.169.254", ["169.254.0.0/16"]) == "cloud metadata"
    assert address_refusal("169.254.169.254", ["169.254.169.254"]) is None


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://10.0.0.7/hook", "a private address"),
        ("http://172.16.0.1/hook", "a private address"),
        ("http://192.168.0.1/hook", "a private address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("http://[fd00:ec2::254]/", "cloud metadata address"),
        ("http://0.0.0.0:80/", "unspecified address"),
        ("http://localhost:9/hook", "localhost resolves to"),
        ("http://127.1/hook", "127.1 resolves to a loopback address"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
        ("ftp://hooks.example.com/", "only http and https"),
    ],
)
async def test_check_webhook_url_refuses_with_a_typed_error(url: str, said: str) -> None:
    with pytest.raises(InvalidMessage, match=r"^reply\.webhook: ") as refused:
        await check_webhook_url(url, [], field="reply.webhook")
    assert said in refused.value.message
    if "address" in said or "host" in said:
        assert "webhooks.allow" in refused.value.message
        assert "/hook" not in refused.value.message  # the host, never the path


async def test_check_webhook_url_allows_by_host_and_by_cidr() -> None:
    await check_webhook_url("http://127.0.0.1:8080/hook", ["127.0.0.1"])
    await check_webhook_url("http://127.0.0.1:8080/hook", ["127.0.0.0/8"])
    await check_webhook_url("http://localhost:8080/hook", ["localhost"])
    await check_webhook_url("http://localhost:8080/hook", ["127.0.0.0/8", "::1"])
    await check_webhook_url("https://93.184.216.34/hook", [])
    with pytest.raises(UnresolvableHost, match="does not resolve"):
        await check_webhook_url("https://no-such-host.invalid/hook", [])


async def test_check_webhook_needs_a_secret_and_a_url_the_guard_passes() -> None:
    await check_webhook("http://127.0.0.1:9/hook", hooks_config().webhooks, field="reply.webhook")
    with pytest.raises(InvalidMessage, match=r"^reply\.webhook: no webhooks\.secret"):
        await check_webhook(
            "http://127.0.0.1:9/hook", hooks_config(secret=[]).webhooks, field="reply.webhook"
        )
    own = hooks_config(secret=[], endpoints=[{"url": "http://127.0.0.1:9/", "secret": SECRET}])
    await check_webhook("http://127.0.0.1:9/hook", own.webhooks)
    with pytest.raises(InvalidMessage, match="loopback"):
        await check_webhook("http://127.0.0.1:9/hook", hooks_config(allow=[]).webhooks)


# --- delivery -----------------------------------------------------------------------------


async def test_every_result_reaches_the_receiver_signed(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    events = [event(receiver.url(f"/results/{i}")) for i in range(20)]
    async with dispatching(hooks_config()):
        for request in events:
            await publish_webhook(publisher, names, request)
        for request in events:
            await reaches(store, request.webhook_id, "delivered")
    assert sorted(r.webhook_id for r in receiver.received) == sorted(e.webhook_id for e in events)
    for got in receiver.received:
        assert got.verified_by == [SECRET]
        assert got.headers["content-type"] == "application/json"
        assert "switchyard" in got.headers["user-agent"].lower()
    first = next(r for r in receiver.received if r.webhook_id == events[0].webhook_id)
    assert first.body == webhook_body(events[0])
    assert first.payload == {
        "type": "job.succeeded",
        "timestamp": events[0].occurred_at.isoformat().replace("+00:00", "Z"),
        "data": events[0].data,
    }
    row = await store.get(events[0].webhook_id)
    assert row is not None and row["attempts"] == 1
    assert [(a["number"], a["status_code"]) for a in row["history"]] == [(1, 200)]


async def test_after_three_500s_the_result_arrives_with_the_same_webhook_id(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    request = event(receiver.plan("/flaky", 500, 500, 500))
    async with dispatching(hooks_config()):
        await publish_webhook(publisher, names, request)
        row = await reaches(store, request.webhook_id, "delivered")
    got = receiver.at("/flaky")
    assert [r.webhook_id for r in got] == [request.webhook_id] * 4
    assert all(r.verified_by == [SECRET] for r in got)
    assert len({r.body for r in got}) == 1  # the same bytes every time
    stamps = [int(r.headers["webhook-timestamp"]) for r in got]
    assert stamps == sorted(stamps)
    assert [a["status_code"] for a in row["history"]] == [500, 500, 500, 200]
    assert [a["number"] for a in row["history"]] == [1, 2, 3, 4]
    assert all(a["latency_ms"] > 0 for a in row["history"])
    gaps = [
        (b["attempted_at"] - a["attempted_at"]).total_seconds()
        for a, b in zip(row["history"], row["history"][1:], strict=False)
    ]
    assert all(0.2 <= gap < 2.0 for gap in gaps), gaps


async def test_a_timeout_is_a_failure_and_retried(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    receiver.slow_s = 1.5
    request = event(receiver.plan("/slow", SLOW))
    async with dispatching(hooks_config(timeout_s=0.3)):
        await publish_webhook(publisher, names, request)
        row = await reaches(store, request.webhook_id, "delivered")
    first, second = row["history"]
    assert first["status_code"] is None and first["error"] == "no answer within 0.3 s"
    assert 250 <= first["latency_ms"] < 1000
    assert second["status_code"] == 200 and second["error"] is None


async def test_a_refused_connection_is_a_failure_with_its_reason(
    dispatching: Dispatching, publisher: Publisher, names: Names, store: WebhookStore
) -> None:
    request = event(f"http://127.0.0.1:{free_port()}/nobody")
    async with dispatching(hooks_config(retry_schedule_s=[0.1])):
        await publish_webhook(publisher, names, request)
        row = await reaches(store, request.webhook_id, "dead")
    assert [a["status_code"] for a in row["history"]] == [None, None]
    assert all(a["error"].startswith("connection failed") for a in row["history"])
    assert row["last_error"].startswith("2 attempts failed; last: connection failed")


async def test_410_disables_the_endpoint_and_later_deliveries_die_without_a_post(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    amqp: AbstractRobustConnection,
) -> None:
    url = receiver.plan(f"/gone/{names.namespace}", 410)
    first, later = event(url), event(url)
    async with dispatching(hooks_config()):
        await publish_webhook(publisher, names, first)
        gone = await reaches(store, first.webhook_id, "dead")
        await publish_webhook(publisher, names, later)
        refused = await reaches(store, later.webhook_id, "dead")
    assert [a["status_code"] for a in gone["history"]] == [410]
    assert "410" in gone["last_error"]
    assert refused["history"] == [] and refused["disabled"] is not None
    assert refused["last_error"].startswith("endpoint disabled")
    assert len(receiver.at(f"/gone/{names.namespace}")) == 1
    letters = await dead_letters(amqp, names, 2)
    assert {m.headers[n.HEADER_DEAD_CODE] for m in letters} == {"webhook_gone"}


async def test_the_last_failure_dead_letters_the_delivery_with_its_history(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    amqp: AbstractRobustConnection,
) -> None:
    request = event(receiver.plan("/down", 503, 503, 503, 503, 503))
    async with dispatching(hooks_config()):
        await publish_webhook(publisher, names, request)
        row = await reaches(store, request.webhook_id, "dead")
    assert row["attempts"] == 4 and len(receiver.at("/down")) == 4
    (letter,) = await dead_letters(amqp, names, 1)
    assert letter.message_id == request.webhook_id
    assert letter.headers[n.HEADER_DEAD_CODE] == "webhook_failed"
    assert letter.headers[n.HEADER_DEAD_QUEUE] == names.webhooks
    assert "4 attempts failed; last: status 503" in str(letter.headers[n.HEADER_DEAD_REASON])
    dead = orjson.loads(letter.body)
    assert dead["webhook_id"] == request.webhook_id and dead["url"] == str(request.url)
    assert dead["payload"] == orjson.loads(webhook_body(request))
    assert [a["status_code"] for a in dead["attempts"]] == [503] * 4
    assert all(a["latency_ms"] > 0 and "attempted_at" in a for a in dead["attempts"])


async def test_127_0_0_1_is_refused_at_send_time_unless_allowed(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    amqp: AbstractRobustConnection,
) -> None:
    request = event(receiver.url("/private"))
    async with dispatching(hooks_config(allow=[])):
        await publish_webhook(publisher, names, request)
        row = await reaches(store, request.webhook_id, "dead")
    assert receiver.received == [] and row["history"] == []
    assert "127.0.0.1 is a loopback address" in row["last_error"]
    (letter,) = await dead_letters(amqp, names, 1)
    assert letter.headers[n.HEADER_DEAD_CODE] == "webhook_refused"


async def test_a_name_that_resolves_to_loopback_is_refused_as_it_connects(
    receiver: Receiver,
) -> None:
    """The pool's resolver is guarded too: a name re-pointed after the attempt's own check."""
    from broker.webhooks.sender import Sender

    sender = Sender(hooks_config(allow=[]).webhooks)
    try:
        port = receiver.base_url.rsplit(":", 1)[1]
        answer = await sender.post(f"http://localhost:{port}/x", {}, b"{}")
    finally:
        await sender.aclose()
    assert answer.refused is not None and "loopback" in answer.refused
    assert receiver.received == []


async def test_rotation_signs_with_every_secret(
    dispatching: Dispatching, publisher: Publisher, names: Names, store: WebhookStore
) -> None:
    old, new = new_secret(), new_secret()
    only_old, only_new = await Receiver([old]).start(), await Receiver([new]).start()
    try:
        a, b = event(only_old.url("/r")), event(only_new.url("/r"))
        async with dispatching(hooks_config(secret=[old, new])):
            await publish_webhook(publisher, names, a)
            await publish_webhook(publisher, names, b)
            await reaches(store, a.webhook_id, "delivered")
            await reaches(store, b.webhook_id, "delivered")
    finally:
        await only_old.stop()
        await only_new.stop()
    assert [r.verified_by for r in only_old.received] == [[old]]
    assert [r.verified_by for r in only_new.received] == [[new]]
    assert only_old.received[0].headers["webhook-signature"].count("v1,") == 2


async def test_an_endpoint_with_its_own_secret_is_signed_with_it(
    dispatching: Dispatching, publisher: Publisher, names: Names, store: WebhookStore
) -> None:
    own = new_secret()
    server = await Receiver([SECRET, own]).start()
    try:
        special, plain = event(server.url("/special/1")), event(server.url("/plain"))
        endpoints = [{"url": server.url("/special/"), "secret": own}]
        async with dispatching(hooks_config(endpoints=endpoints)):
            await publish_webhook(publisher, names, special)
            await publish_webhook(publisher, names, plain)
            await reaches(store, special.webhook_id, "delivered")
            await reaches(store, plain.webhook_id, "delivered")
    finally:
        await server.stop()
    assert [r.verified_by for r in server.at("/special/1")] == [[own]]
    assert [r.verified_by for r in server.at("/plain")] == [[SECRET]]


async def test_a_result_published_twice_is_recorded_and_sent_once(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    amqp: AbstractRobustConnection,
) -> None:
    request = event(receiver.url("/twin"))
    async with dispatching(hooks_config()):
        await publish_webhook(publisher, names, request)
        await publish_webhook(publisher, names, request)  # a twin's result: the same id

        async def drained() -> bool:
            return await queue_depth(amqp, names.webhooks) == 0

        await reaches(store, request.webhook_id, "delivered")
        await until(drained, "the webhooks queue drained")
        await asyncio.sleep(0.3)
    assert len(receiver.at("/twin")) == 1


async def test_a_bad_message_is_dead_lettered_and_the_next_one_delivered(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    amqp: AbstractRobustConnection,
) -> None:
    good = event(receiver.url("/after-bad"))
    async with dispatching(hooks_config()):
        await publisher.publish(names.webhooks, b'{"schema_version": 1, "url": 3}')
        await publish_webhook(publisher, names, good)
        await reaches(store, good.webhook_id, "delivered")
    (letter,) = await dead_letters(amqp, names, 1)
    assert letter.headers[n.HEADER_DEAD_CODE] == "invalid_message"
    assert "webhook_id" in str(letter.headers[n.HEADER_DEAD_REASON])


async def test_a_delivery_left_by_a_dead_dispatcher_is_claimed_by_another(
    dispatching: Dispatching, receiver: Receiver, store: WebhookStore
) -> None:
    """Recorded and leased, then its dispatcher died before attempting: the lease lapses and
    the claim loop of another dispatcher sends it."""
    request = event(receiver.url("/orphan"))
    leased = await store.record(request, webhook_body(request), utcnow() + timedelta(seconds=0.5))
    assert leased is not None
    async with dispatching(hooks_config()):
        await reaches(store, request.webhook_id, "delivered")
    assert [r.verified_by for r in receiver.at("/orphan")] == [[SECRET]]


async def test_postgres_away_loses_no_event(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    """A dispatcher that cannot record an event returns it to the queue (after a pause)
    instead of acking it; one with Postgres sends it."""
    request = event(receiver.url("/pg-away"))
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    cut_off = WebhookDispatcher(AMQP_URL, hooks_config(), names, database_url=nowhere)
    await cut_off.start()
    try:
        await publish_webhook(publisher, names, request)
        await asyncio.sleep(1.5)  # tried, failed, returned: at least once
        assert receiver.received == []
    finally:
        await cut_off.stop(grace_s=2)
    async with dispatching(hooks_config()):
        await reaches(store, request.webhook_id, "delivered")
    assert [r.verified_by for r in receiver.at("/pg-away")] == [[SECRET]]


async def test_a_reload_takes_the_new_allow_list(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    refused, allowed = event(receiver.url("/before")), event(receiver.url("/after"))
    async with dispatching(hooks_config(allow=[])) as dispatcher:
        await publish_webhook(publisher, names, refused)
        await reaches(store, refused.webhook_id, "dead")
        await dispatcher.apply(hooks_config(allow=["127.0.0.0/8"]))
        await publish_webhook(publisher, names, allowed)
        await reaches(store, allowed.webhook_id, "delivered")
    assert receiver.at("/before") == [] and len(receiver.at("/after")) == 1


async def test_replay_sends_it_again_with_the_same_id_and_enables_its_endpoint(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
) -> None:
    url = receiver.plan(f"/replayed/{names.namespace}", 410)
    request = event(url)
    async with dispatching(hooks_config()):
        await publish_webhook(publisher, names, request)
        await reaches(store, request.webhook_id, "dead")
        assert await store.replay(request.webhook_id)
        row = await reaches(store, request.webhook_id, "delivered")
        assert await store.replay(request.webhook_id)
        await until(lambda: _count(receiver, f"/replayed/{names.namespace}", 3), "a third delivery")
        row = await reaches(store, request.webhook_id, "delivered")
    got = receiver.at(f"/replayed/{names.namespace}")
    assert [r.webhook_id for r in got] == [request.webhook_id] * 3
    assert [a["status_code"] for a in row["history"]] == [410, 200, 200]
    assert row["series_start"] == 2 and row["disabled"] is None
    assert not await store.replay("msg_no_such_delivery")


async def _count(receiver: Receiver, path: str, count: int) -> bool:
    return len(receiver.at(path)) >= count


# --- the gateway's routes --------------------------------------------------------------------


@asynccontextmanager
async def gateway_client(config: Config, names: Names, database_url: str) -> AsyncIterator[Any]:
    """The gateway's app with the webhook routes, called in process (no server, no pipeline)."""
    from fastapi import FastAPI

    from broker.gateway.app import make_app
    from broker.gateway.service import Gateway
    from broker.gateway.webhooks import router

    gateway = Gateway(AMQP_URL, config, names, redis_url=REDIS_URL, database_url=database_url)
    asgi = make_app(gateway)
    app = asgi
    while not isinstance(app, FastAPI):  # below the outer ASGI layers (metrics, the fast path)
        app = app.app  # type: ignore[attr-defined]
    if not any(getattr(r, "path", "") == "/v1/webhooks/deliveries" for r in app.routes):
        app.include_router(router)  # until app.py includes it
    transport = httpx.ASGITransport(app=asgi)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http
    finally:
        await gateway.stop(grace_s=1)


def _key(key_id: str, secret: str) -> dict[str, str]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}


async def test_the_gateway_lists_shows_and_replays_the_callers_deliveries(
    dispatching: Dispatching,
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    database_url: str,
) -> None:
    mine, theirs = f"team-{names.namespace}", f"other-{names.namespace}"
    keys = [_key(mine, "sk-mine"), _key(theirs, "sk-theirs")]
    config = hooks_config(keys=keys)
    me, other = {"authorization": "Bearer sk-mine"}, {"authorization": "Bearer sk-theirs"}
    requests = [event(receiver.url(f"/gw/{i}"), owner=mine) for i in range(3)]
    async with dispatching(config), gateway_client(config, names, database_url) as http:
        for request in requests:
            await publish_webhook(publisher, names, request)
            await reaches(store, request.webhook_id, "delivered")
        page = (await http.get("/v1/webhooks/deliveries?limit=2", headers=me)).json()
        assert [d["id"] for d in page["data"]] == [r.webhook_id for r in requests[::-1][:2]]
        assert page["has_more"] is True and page["data"][0]["state"] == "delivered"
        rest = await http.get(f"/v1/webhooks/deliveries?after={page['data'][1]['id']}", headers=me)
        assert [d["id"] for d in rest.json()["data"]] == [requests[0].webhook_id]
        assert (await http.get("/v1/webhooks/deliveries", headers=other)).json()["data"] == []
        one = await http.get(f"/v1/webhooks/deliveries/{requests[0].webhook_id}", headers=me)
        assert one.status_code == 200
        assert [a["status_code"] for a in one.json()["attempts"]] == [200]
        hidden = await http.get(f"/v1/webhooks/deliveries/{requests[0].webhook_id}", headers=other)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        refused = await http.post(
            f"/v1/webhooks/deliveries/{requests[0].webhook_id}/replay", headers=other
        )
        assert refused.status_code == 404
        replayed = await http.post(
            f"/v1/webhooks/deliveries/{requests[0].webhook_id}/replay", headers=me
        )
        assert replayed.status_code == 202 and replayed.json()["state"] == "pending"
        await until(lambda: _count(receiver, "/gw/0", 2), "the replay to arrive")
    assert [r.webhook_id for r in receiver.at("/gw/0")] == [requests[0].webhook_id] * 2
    assert all(r.verified_by == [SECRET] for r in receiver.at("/gw/0"))


# --- the CLI -------------------------------------------------------------------------------


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    code = "from broker.cli.webhooks import webhooks_app; webhooks_app()"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        cwd=REPO,
        env={**env, "COLUMNS": "250"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_the_cli_runs_the_dispatcher_lists_and_replays(
    receiver: Receiver,
    publisher: Publisher,
    names: Names,
    store: WebhookStore,
    database_url: str,
    tmp_path: Path,
    amqp: AbstractRobustConnection,
) -> None:
    config_path = tmp_path / "hooks.yaml"
    config_path.write_text(yaml.safe_dump(hooks_config().model_dump(mode="json")))
    env = process_env(names, database_url, config_path)
    request = event(receiver.url("/cli?token=secret-token"))
    code = "from broker.cli.webhooks import webhooks_app; webhooks_app()"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:

        async def declared() -> bool:
            try:
                return await queue_depth(amqp, names.webhooks) >= 0
            except Exception:
                return False

        await until(declared, "the dispatcher to declare its queue")
        await publish_webhook(publisher, names, request)
        await reaches(store, request.webhook_id, "delivered")
        status, listed = await _cli(env, "list", "--state", "delivered", "--limit", "100")
        assert status == 0, listed
        assert request.webhook_id in listed and "secret-token" not in listed
        status, said = await _cli(env, "replay", request.webhook_id)
        assert status == 0 and "replayed" in said
        await until(lambda: _count(receiver, "/cli", 2), "the replay to arrive")
        status, said = await _cli(env, "replay", "msg_nothing")
        assert status == 1 and "no webhook delivery" in said
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 20)
        await delete_queues(amqp, names.webhooks, names.control)
    assert process.returncode == 0, err.decode()[-2000:]
    assert [r.webhook_id for r in receiver.at("/cli")] == [request.webhook_id] * 2


def test_an_endpoints_secret_signs_only_urls_truly_under_it() -> None:
    """A plain string prefix would hand Acme's secret to look-alike hosts."""
    acme = new_secret()
    config = hooks_config(endpoints=[{"url": "https://hooks.acme.com/in", "secret": acme}])
    assert config.webhooks.secrets_for("https://hooks.acme.com/in") == [acme]
    assert config.webhooks.secrets_for("https://hooks.acme.com/in/orders") == [acme]
    for other in (
        "https://hooks.acme.com.evil.net/in",
        "https://hooks.acme.com@evil.net/in",
        "https://hooks.acme.com/inbox",
        "http://hooks.acme.com/in",
        "https://hooks.acme.com:8443/in",
    ):
        assert config.webhooks.secrets_for(other) == [SECRET], other

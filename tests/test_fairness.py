"""Fairness through the real pipeline: a flood from one consumer does not make another wait."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from broker.client import SwitchyardClient
from broker.core.config import load_config
from broker.core.names import HEADER_KEY, Names
from broker.state.fairness import lane_for
from tests.conftest import AMQP_URL, MockProvider, eventually, queue_depth, write_config

FLOOD, TRICKLE = "sk-flood", "sk-trickle"
CONCURRENCY = 4
BOUND = 40
"""At most this many of the 1,000 flood jobs queued ahead finish before the last of the trickle's
10: the lanes interleave them (a prefetch window of 8 per lane, twice the concurrency); without
lanes all 1,000 would."""


def key(name: str, secret: str) -> dict[str, Any]:
    return {"id": name, "consumer": name, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}


async def test_a_consumer_sending_after_a_flood_of_another_waits_for_a_few_not_all(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    providers = [
        {"id": "fair", "concurrency": CONCURRENCY, "models": {"m": {"input": 1, "output": 1}}}
    ]
    config = load_config(
        write_config(
            tmp_path / "p.yaml",
            mock,
            providers,
            keys=[key("flood", FLOOD), key("trickle", TRICKLE)],
            consumers={"flood": {}, "trickle": {}},
        )
    )
    flood_key, trickle_key = config.keys
    assert lane_for(flood_key, config.fair_lanes) != lane_for(trickle_key, config.fair_lanes)
    mock.configure(latency_ms=20)
    channel = await amqp.channel()
    results = await channel.declare_queue(f"{names.namespace}.fair-results", exclusive=True)

    async def send(prefix: str, secret: str, count: int) -> None:
        for i in range(count):
            body = {
                "schema_version": 1,
                "job_id": f"{prefix}-{i}",
                "model": "m",
                "priority": 3,
                "messages": [{"role": "user", "content": f"{prefix} {i}"}],
            }
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    reply_to=results.name,
                    priority=3,
                    headers={HEADER_KEY: secret},
                ),
                routing_key=names.jobs,
            )

    order: list[str] = []
    flood_lane = names.provider("fair", lane_for(flood_key, config.fair_lanes))
    trickle_lane = names.provider("fair", lane_for(trickle_key, config.fair_lanes))
    # The flood is queued first and the trickle after it, while no worker runs, so where the
    # trickle's jobs finish depends on fairness alone, not on how fast the machine is.
    async with pipeline(config, workers=[], accountant=False):
        await send("flood", FLOOD, 1000)

        async def flooded() -> bool:
            return await queue_depth(amqp, flood_lane) == 1000

        await eventually(flooded, 60, "the flood to wait in its lane")
        await send("trickle", TRICKLE, 10)

        async def trickled() -> bool:
            return await queue_depth(amqp, trickle_lane) == 10

        await eventually(trickled, 30, "the trickle to wait in its lane")
    async with (
        pipeline(config, scheduler=False, accountant=False),
        results.iterator(timeout=60) as messages,
    ):
        async for message in messages:
            await message.ack()
            order.append(json.loads(message.body)["job_id"])
            if sum(j.startswith("trickle") for j in order) == 10:
                break
    await channel.close()
    flood_before_last_trickle = sum(j.startswith("flood") for j in order)
    assert flood_before_last_trickle <= BOUND


async def test_lanes_added_by_a_new_config_are_served_by_the_running_worker(
    names: Names, tmp_path: Path, pipeline: Any, mock: MockProvider
) -> None:
    """The scheduler routes to the new lanes at once; the worker used to consume only the lanes
    it started with, so a job routed to a new one waited there for ever."""
    providers = [{"id": "fair", "models": {"m": {"input": 1, "output": 1}}}]
    keys = [key("trickle", TRICKLE)]
    one = load_config(write_config(tmp_path / "one.yaml", mock, providers, keys=keys, fair_lanes=1))
    eight = load_config(
        write_config(tmp_path / "eight.yaml", mock, providers, keys=keys, fair_lanes=8)
    )
    assert lane_for(eight.keys[0], 8) != 0
    async with pipeline(one, accountant=False) as services:
        for service in services:
            await service.apply(eight)
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            result = await client.complete(
                [{"role": "user", "content": "in a new lane"}],
                model="m",
                api_key=TRICKLE,
                timeout_s=10,
            )
    assert result.status.value == "succeeded"

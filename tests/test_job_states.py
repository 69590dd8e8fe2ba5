"""Tracked jobs on real RabbitMQ and Redis: position and ETA while queued, and cancellation that
is never late (a job cancelled while queued is never called and gives its reservation back)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio import Redis

from broker.client import SwitchyardClient, make_job
from broker.core.config import load_config
from broker.core.names import Names
from broker.core.windows import Period, window
from broker.state.job_states import JobStanding, JobStates
from tests.conftest import AMQP_URL, MockProvider, eventually, write_config

SECRET = "sk-tracked-jobs-key"
KEY = {"id": "team-a", "key_sha256": hashlib.sha256(SECRET.encode()).hexdigest(), "rpm": 100}


async def all_queued(states: JobStates, job_ids: list[str]) -> bool:
    standings = [await states.standing(job_id) for job_id in job_ids]
    return all(s.state == "queued" for s in standings)


async def test_queued_jobs_have_a_position_and_eta_that_shrink_and_a_cancelled_one_never_runs(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
    redis: Redis,
) -> None:
    providers = [{"id": "p", "concurrency": 1, "models": {"m": {"input": 1, "output": 1}}}]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers, keys=[KEY]))
    mock.configure(latency_ms=600)  # a drain of some seconds: the rate has time to be measured
    if datetime.now(UTC).second >= 45:  # the whole test inside one minute's rpm window
        await asyncio.sleep(61 - datetime.now(UTC).second)
    minute = window(Period.MINUTE, datetime.now(UTC), ZoneInfo("UTC")).id
    rpm = names.quota_bucket("key", "team-a", "rpm", minute)
    states = JobStates(redis, names)
    priorities = [1, 1, 5, 1, 5, 1, 1, 1]
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        results_queue = await client.open_results("tracked")
        ids = []
        # No worker yet: every job waits in the provider's queue.
        async with pipeline(config, workers=[]):
            for i, priority in enumerate(priorities):
                job = make_job(
                    [{"role": "user", "content": f"tracked {i}"}], model="m", priority=priority
                )
                ids.append(await client.submit(job, results_queue=results_queue, api_key=SECRET))
            await eventually(lambda: all_queued(states, ids), 20, "every job queued")
            standing = {job_id: await states.standing(job_id) for job_id in ids}
            # Higher priority first, then by arrival at the provider's queue (the scheduler
            # handles several jobs at once, so that order is not quite the producer's).
            assert {standing[ids[2]].position, standing[ids[4]].position} == {0, 1}
            assert sorted(s.position or 0 for s in standing.values()) == list(range(8))
            assert all(s.eta_s is None for s in standing.values())  # nothing served yet
            assert all(s.owner == "team-a" and s.provider == "p" for s in standing.values())
            assert int(await redis.get(rpm) or 0) == 8  # each holds its request

            doomed = ids[3]
            assert await states.cancel(doomed, "team-b") == "not_found"  # not its job
            assert await states.cancel(doomed, "team-a") == "cancelled"
            assert (await states.standing(doomed)).state == "cancelled"
            behind = [
                j for j in ids if (standing[j].position or 0) > (standing[doomed].position or 0)
            ]
            for job_id in behind:  # one fewer ahead of each
                assert (await states.standing(job_id)).position == (
                    standing[job_id].position or 0
                ) - 1

            last: list[JobStanding] = []
            # A worker drains the queue one call at a time.
            async with pipeline(config, scheduler=False, accountant=False, workers=["p"]):

                async def watched_to_the_end() -> bool:
                    now = await states.standing(ids[7])
                    if now.state == "queued":
                        last.append(now)
                    return now.state in ("running", "done")

                await eventually(watched_to_the_end, 30, "the last job's call", interval_s=0.1)
                assert await states.cancel(ids[7], "team-a") in ("running", "done")  # too late
                results = await collect(amqp, results_queue, 8)

    positions = [s.position for s in last]
    assert positions == sorted(positions, reverse=True) and positions[0] <= 6
    assert len(set(positions)) > 2  # seen shrinking
    assert positions[-1] is not None and positions[-1] <= 1
    # Farther back in the queue, a later start (the rate is measured as the queue drains).
    with_eta = [(s.position, s.eta_s) for s in last if s.eta_s is not None]
    far, near = max(with_eta), min(with_eta)
    assert far[0] > near[0] and far[1] > near[1], with_eta
    statuses = {r["job_id"]: r["status"] for r in results}
    assert statuses.pop(doomed) == "cancelled"
    assert set(statuses.values()) == {"succeeded"}
    cancelled = next(r for r in results if r["job_id"] == doomed)
    assert cancelled["error"]["code"] == "cancelled" and cancelled["attempts"] == []
    assert mock.stats()["calls"] == 7

    async def given_back() -> bool:
        return int(await redis.get(rpm) or 0) == 7

    await eventually(given_back, 10, "the cancelled job's request given back")


async def collect(amqp: AbstractRobustConnection, queue: str, count: int) -> list[dict[str, Any]]:
    channel = await amqp.channel()
    got: list[dict[str, Any]] = []
    results = await channel.get_queue(queue)
    async with results.iterator(timeout=30) as messages:
        message: aio_pika.abc.AbstractIncomingMessage
        async for message in messages:
            await message.ack()
            got.append(json.loads(message.body))
            if len(got) == count:
                break
    await channel.close()
    return got


async def test_the_client_library_asks_where_its_job_stands_and_cancels_it(
    amqp: AbstractRobustConnection,
    names: Names,
    tmp_path: Path,
    pipeline: Any,
    mock: MockProvider,
) -> None:
    other = "sk-another-team"
    keys = [KEY, {"id": "team-b", "key_sha256": hashlib.sha256(other.encode()).hexdigest()}]
    providers = [{"id": "p", "concurrency": 1, "models": {"m": {"input": 1, "output": 1}}}]
    config = load_config(write_config(tmp_path / "p.yaml", mock, providers, keys=keys))
    client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
    async with client:
        results_queue = await client.open_results("asked")
        async with pipeline(config, workers=[]):
            ids = []
            for i in range(3):
                job = make_job([{"role": "user", "content": f"asked {i}"}], model="m")
                ids.append(await client.submit(job, results_queue=results_queue, api_key=SECRET))

            async def placed() -> bool:
                standings = [await client.standing(i, api_key=SECRET) for i in ids]
                return all(s.state == "queued" for s in standings)

            await eventually(placed, 20, "the three jobs placed")
            # Submitted and located in one call: the scheduler placed it behind the other three.
            job = make_job([{"role": "user", "content": "asked 3"}], model="m")
            located = await client.submit_located(job, results_queue=results_queue, api_key=SECRET)
            assert (located.state, located.position, located.provider) == ("queued", 3, "p")
            ids.append(job.job_id)
            # The first three in the order the scheduler placed them (it handles several at once).
            before = {i: (await client.standing(i, api_key=SECRET)).position or 0 for i in ids}
            assert sorted(before.values()) == [0, 1, 2, 3] and before[ids[3]] == 3
            standing = await client.standing(ids[2], api_key=SECRET)
            assert (standing.provider, standing.model) == ("p", "m")
            assert float(standing.est_cost_usd or 0) > 0
            assert (await client.standing(ids[2], api_key=other)).state == "not_found"
            refused = await client.standing(ids[2], api_key="sk-nobody")
            assert refused.error is not None and refused.error.code.value == "unauthorized"
            assert (await client.cancel(ids[1], api_key=other)).state == "not_found"
            assert (await client.cancel(ids[1], api_key=SECRET)).state == "cancelled"
            for i in ids:  # one fewer ahead of each behind it
                if before[i] > before[ids[1]]:
                    now = (await client.standing(i, api_key=SECRET)).position
                    assert now == before[i] - 1
            async with pipeline(config, scheduler=False, accountant=False, workers=["p"]):
                results = await collect(amqp, results_queue, 4)
    statuses = {r["job_id"]: r["status"] for r in results}
    assert statuses == {
        ids[0]: "succeeded",
        ids[1]: "cancelled",
        ids[2]: "succeeded",
        ids[3]: "succeeded",
    }
    assert mock.stats()["calls"] == 3


async def test_a_cancel_before_placement_is_obeyed_only_from_the_jobs_own_caller(
    redis: Redis, names: Names
) -> None:
    states = JobStates(redis, names)

    async def placed(job_id: str) -> str:
        return await states.queued(
            job_id, "p", 1, owner="team-a", est_cost_usd="0", model="m", deadline=None, again=False
        )

    assert await states.cancel("guessed", "team-b") == "cancelled"  # nothing to check it by yet
    assert await placed("guessed") == "queued"  # not team-b's job: the cancel is not obeyed
    assert await states.cancel("own", "team-a") == "cancelled"
    assert await placed("own") == "cancelled"
    assert await states.cancel("operator", "*") == "cancelled"
    assert await placed("operator") == "cancelled"
    assert (await states.standing("guessed")).position == 0

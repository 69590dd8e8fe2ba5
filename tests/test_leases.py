"""The global concurrency cap against the real Redis: capacity under contention, release, expiry of
an abandoned lease, renewal."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from broker.core.names import Names
from broker.core.settings import Settings
from broker.state.leases import LeaseSemaphore
from tests.conftest import eventually

REDIS_URL = os.environ.get("SWITCHYARD_REDIS_URL", Settings().redis_url)
PREFIX = f"sytest-{secrets.token_hex(3)}"
_counter = iter(range(1, 1_000_000))


@pytest.fixture(scope="module")
async def redis() -> AsyncIterator[Redis]:
    url = urlsplit(REDIS_URL)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {host}:{port}")
        pytest.skip(f"Redis is not reachable at {host}:{port}")
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=f"{PREFIX}*", count=500):
            await client.delete(key)
        await client.aclose()


@pytest.fixture
def key() -> str:
    return Names(f"{PREFIX}.l{next(_counter)}").lease("mock")


async def test_capacity_holds_under_fifty_acquirers(redis: Redis, key: str) -> None:
    sem = LeaseSemaphore(redis, key, capacity=5, lease_s=30)
    grants = await asyncio.gather(*(sem.acquire(f"w{i}") for i in range(50)))
    leases = [g for g in grants if g is not None]
    assert len(leases) == 5
    assert await sem.held() == 5
    assert await redis.zcard(key) == 5
    assert 0 < await redis.pttl(key) <= 30_000  # the set goes when its last lease would
    for lease in leases:
        assert await sem.release(lease)
    assert await sem.held() == 0
    assert not await sem.release(leases[0])


async def test_waiters_take_turns_never_above_capacity(redis: Redis, key: str) -> None:
    sem = LeaseSemaphore(redis, key, capacity=4, lease_s=30)
    running = 0
    done = 0
    peak = 0
    peak_held = 0

    async def work(i: int) -> None:
        nonlocal running, done, peak, peak_held
        lease = await sem.acquire_wait(f"w{i}", timeout_s=20, poll_s=0.01)
        assert lease is not None
        running += 1
        peak = max(peak, running)
        peak_held = max(peak_held, await sem.held())
        await asyncio.sleep(0.01)
        running -= 1
        done += 1
        assert await sem.release(lease)

    await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(50))), 30)
    assert done == 50
    assert 2 <= peak <= 4
    assert peak_held <= 4
    assert await sem.held() == 0


async def test_release_frees_a_slot(redis: Redis, key: str) -> None:
    sem = LeaseSemaphore(redis, key, capacity=2, lease_s=30)
    first, second = await sem.acquire("a"), await sem.acquire("b")
    assert first is not None and second is not None
    assert first.startswith("a:")
    assert await sem.acquire("c") is None
    assert await sem.acquire_wait("c", timeout_s=0.1, poll_s=0.02) is None
    assert await sem.release(first)
    third = await sem.acquire("c")
    assert third is not None
    assert await sem.held() == 2


async def test_an_abandoned_lease_expires_and_its_slot_is_granted(redis: Redis, key: str) -> None:
    sem = LeaseSemaphore(redis, key, capacity=1, lease_s=0.3)
    dead = await sem.acquire("dies")
    assert dead is not None
    assert await sem.acquire("next") is None
    began = time.monotonic()
    lease = await sem.acquire_wait("next", timeout_s=3, poll_s=0.02)
    assert lease is not None
    assert 0.15 < time.monotonic() - began < 3
    assert await redis.zrange(key, 0, -1) == [lease.encode()]
    assert not await sem.renew(dead)  # too late: its slot is someone else's
    assert await sem.held() == 1


async def test_renew_extends(redis: Redis, key: str) -> None:
    sem = LeaseSemaphore(redis, key, capacity=1, lease_s=0.4)
    lease = await sem.acquire("long-call")
    assert lease is not None
    expiry = await redis.zscore(key, lease)
    assert expiry is not None
    for _ in range(5):  # a 1 s call on a 0.4 s lease, renewed every 0.2 s
        await asyncio.sleep(0.2)
        assert await sem.renew(lease)
        assert await sem.acquire("other") is None
    renewed = await redis.zscore(key, lease)
    assert renewed is not None and renewed >= expiry + 900
    other = await sem.acquire_wait("other", timeout_s=3, poll_s=0.02)
    assert other is not None
    assert not await sem.renew(lease)


async def test_bad_arguments(redis: Redis, key: str) -> None:
    with pytest.raises(ValueError):
        LeaseSemaphore(redis, key, capacity=0, lease_s=1)
    with pytest.raises(ValueError):
        LeaseSemaphore(redis, key, capacity=1, lease_s=0)


async def test_an_acquire_cancelled_while_redis_grants_gives_the_lease_back(
    redis: Redis, key: str
) -> None:
    """Cancelled after Redis granted but before the answer came back, the lease was lost to its
    holder and held the slot until it expired (here 60 s: a third of the cap for a minute)."""
    sem = LeaseSemaphore(redis, key, capacity=3, lease_s=60)
    grant = sem._acquire

    async def slow_answer(**kwargs: object) -> object:
        granted = await grant(**kwargs)  # Redis has granted it ...
        await asyncio.sleep(2)  # ... and the answer is still on its way
        return granted

    sem._acquire = slow_answer  # type: ignore[method-assign]
    acquiring = asyncio.create_task(sem.acquire("h"))

    async def granted() -> bool:
        return await sem.held() == 1

    await eventually(granted, 1.5, "the lease granted in Redis")
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring

    async def given_back() -> bool:
        return await sem.held() == 0

    await eventually(given_back, 5, "the lease given back")

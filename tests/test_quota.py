"""Quota reservations against the real Redis: all-or-nothing, exact counters, two processes at once,
idempotent replays, reconcile/release/expiry, never resurrecting a window, threshold alerts once."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from broker.core.names import Names
from broker.core.pricing import Unit, nanos_to_usd, usd_to_nanos
from broker.core.settings import Settings
from broker.state.quota import (
    Bucket,
    QuotaStore,
    ReservationState,
    Reserved,
    Short,
    ThresholdCrossed,
)

REDIS_URL = os.environ.get("SWITCHYARD_REDIS_URL", Settings().redis_url)
PREFIX = f"sytest-{secrets.token_hex(3)}"
REPO = Path(__file__).resolve().parent.parent
_counter = iter(range(1, 1_000_000))


def _need_redis() -> None:
    url = urlsplit(REDIS_URL)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {host}:{port}")
        pytest.skip(f"Redis is not reachable at {host}:{port}")


@pytest.fixture(scope="module")
async def redis() -> AsyncIterator[Redis]:
    _need_redis()
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=f"{PREFIX}*", count=500):
            await client.delete(key)
        await client.aclose()


@pytest.fixture
async def names(redis: Redis) -> Names:
    """A namespace whose quota counters are whole (it has an epoch)."""
    names = Names(f"{PREFIX}.q{next(_counter)}")
    await redis.set(names.quota_epoch, b"test")
    return names


@pytest.fixture
def store(redis: Redis, names: Names) -> QuotaStore:
    return QuotaStore(redis, names)


@pytest.fixture
async def clients() -> AsyncIterator[list[Redis]]:
    """Extra connections (their own pools), closed after the test."""
    made: list[Redis] = []
    yield made
    for client in made:
        await client.aclose()


def bucket(
    names: Names,
    metric: str,
    amount: int,
    limit: int,
    unit: Unit = "requests",
    expires_in: float = 60.0,
    window_id: str = "w1",
) -> Bucket:
    return Bucket(
        key=names.quota_bucket("key", "team-a", metric, window_id),
        unit=unit,
        amount=amount,
        limit=limit,
        expires_at=time.time() + expires_in,
        label=f"key team-a {metric}",
    )


async def counters(store: QuotaStore, *buckets: Bucket) -> list[int]:
    return [await store.usage(b.key) for b in buckets]


async def holds(redis: Redis, names: Names) -> set[str]:
    return {m.decode() for m in await redis.zrange(names.redis_key("quota-holds"), 0, -1)}


# ---------------------------------------------------------------------------------------------


async def test_all_or_nothing(store: QuotaStore, names: Names, redis: Redis) -> None:
    rpm = bucket(names, "rpm", 1, 10)
    tpm = bucket(names, "tpm", 200, 1000, "tokens", expires_in=42)
    usd = bucket(names, "usd-day", 1_000, 500_000, "usd_nanos")
    assert isinstance(
        await store.reserve("pre", [bucket(names, "tpm", 900, 1000, "tokens")], 30), Reserved
    )

    short = await store.reserve("job-1", [rpm, tpm, usd], 30)
    assert isinstance(short, Short)
    assert (short.bucket_label, short.limit, short.current) == ("key team-a tpm", 1000, 900)
    assert (short.bucket_key, short.amount, short.never_fits) == (tpm.key, 200, False)
    assert 40 < short.retry_after_s <= 42
    assert await counters(store, rpm, tpm, usd) == [0, 900, 0]
    assert not await redis.exists(rpm.key, usd.key)
    assert await store.state("job-1") is None
    assert await holds(redis, names) == {"pre"}

    fits = [rpm, bucket(names, "tpm", 100, 1000, "tokens"), usd]
    reserved = await store.reserve("job-1", fits, 30)
    assert isinstance(reserved, Reserved)
    assert (reserved.state, reserved.replayed) == (ReservationState.HELD, False)
    assert reserved.hold_until == pytest.approx(time.time() + 30, abs=2)
    assert await counters(store, rpm, tpm, usd) == [1, 1000, 1_000]
    assert await holds(redis, names) == {"pre", "job-1"}
    # The counter lives until its window ends plus the margin (60 s by default).
    assert 59_000 < await redis.pttl(rpm.key) <= 120_000


async def test_never_fits_and_bad_input(store: QuotaStore, names: Names) -> None:
    short = await store.reserve("big", [bucket(names, "tpm", 5000, 1000, "tokens")], 30)
    assert isinstance(short, Short)
    assert short.never_fits
    b = bucket(names, "rpm", 1, 10)
    with pytest.raises(ValueError, match="twice"):
        await store.reserve("dup", [b, b], 30)
    with pytest.raises(ValueError):
        bucket(names, "rpm", -1, 10)
    with pytest.raises(ValueError):
        await store.reserve("x", [b], 0)


_CHILD = """
import asyncio, json, sys, time
from redis.asyncio import BlockingConnectionPool, Redis
from broker.core.names import Names
from broker.state.quota import Bucket, QuotaStore, Reserved

async def main(url, namespace, key, go, tag, n, expires_at):
    # A blocking pool queues calls for a connection (the default pool raises past 100).
    redis = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=32))
    store = QuotaStore(redis, Names(namespace))
    b = Bucket(key, "requests", 1, 100, expires_at, "key team-a rpm")
    await redis.ping()
    print("ready", flush=True)
    if not await redis.blpop([go], timeout=20):
        raise SystemExit("no go signal")
    started = time.time()
    results = await asyncio.gather(*(store.reserve(f"{tag}-{i}", [b], 60) for i in range(n)))
    granted = sum(isinstance(r, Reserved) for r in results)
    print(json.dumps({"granted": granted, "start": started, "end": time.time()}), flush=True)
    await redis.aclose()

url, namespace, key, go, tag, n, expires_at = sys.argv[1:]
asyncio.run(main(url, namespace, key, go, tag, int(n), float(expires_at)))
"""


async def test_two_processes_never_overshoot(store: QuotaStore, names: Names, redis: Redis) -> None:
    rpm = bucket(names, "rpm", 1, 100)
    go = names.redis_key("test-go")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            REDIS_URL,
            names.namespace,
            rpm.key,
            go,
            tag,
            "250",
            str(rpm.expires_at),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"ready", line
        await redis.rpush(go, "go", "go")  # both start together
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert all(p.returncode == 0 for p in procs), [err.decode() for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    # The two processes' calls ran at the same time (whichever won more of the 100).
    assert max(r["start"] for r in reports) < min(r["end"] for r in reports), reports
    assert sum(r["granted"] for r in reports) == 100
    assert await store.usage(rpm.key) == 100
    assert len(await holds(redis, names)) == 100


async def test_reserve_is_idempotent(store: QuotaStore, names: Names) -> None:
    tpm = bucket(names, "tpm", 300, 1000, "tokens")
    first = await store.reserve("job-1", [tpm], 30)
    again = await store.reserve("job-1", [tpm], 30)
    assert isinstance(first, Reserved)
    assert isinstance(again, Reserved)
    assert again.replayed
    assert (again.state, again.hold_until) == (ReservationState.HELD, first.hold_until)
    assert await store.usage(tpm.key) == 300
    await store.reconcile("job-1", {"tokens": 250})
    replay = await store.reserve("job-1", [tpm], 30)
    assert isinstance(replay, Reserved)
    assert (replay.replayed, replay.state) == (True, ReservationState.RECONCILED)
    assert await store.usage(tpm.key) == 250


async def test_reconcile_charges_the_difference_once(
    store: QuotaStore, names: Names, redis: Redis
) -> None:
    rpm = bucket(names, "rpm", 1, 10)
    tpm = bucket(names, "tpm", 500, 10_000, "tokens")
    tpd = bucket(names, "tpd", 500, 100_000, "tokens")
    usd = bucket(names, "usd-day", usd_to_nanos(Decimal("0.00002")), 10_000_000, "usd_nanos")
    assert isinstance(await store.reserve("job-1", [rpm, tpm, tpd, usd], 30), Reserved)
    assert await counters(store, rpm, tpm, tpd, usd) == [1, 500, 500, 20_000]

    settled = await store.reconcile("job-1", {"tokens": 320, "usd_nanos": 12_345})
    assert settled.previous is ReservationState.HELD
    # Requests were not named: the reserved request stands.
    assert await counters(store, rpm, tpm, tpd, usd) == [1, 320, 320, 12_345]
    assert await store.state("job-1") is ReservationState.RECONCILED
    assert await holds(redis, names) == set()
    ttl = await redis.ttl(names.redis_key("reservation", "job-1"))
    assert 0 < ttl <= 86_400

    again = await store.reconcile("job-1", {"tokens": 9_000, "usd_nanos": 1})
    assert again.previous is ReservationState.RECONCILED
    assert await counters(store, rpm, tpm, tpd, usd) == [1, 320, 320, 12_345]

    # An underestimate is charged up to the actual use.
    assert isinstance(await store.reserve("job-2", [tpm, usd], 30), Reserved)
    await store.reconcile("job-2", {"tokens": 1_250, "usd_nanos": 31_000})
    assert await counters(store, tpm, usd) == [320 + 1_250, 12_345 + 31_000]

    unknown = await store.reconcile("nobody", {"tokens": 5})
    assert unknown.previous is None
    assert await counters(store, tpm) == [1_570]
    with pytest.raises(ValueError):
        await store.reconcile("job-2", {"tokens": -1})


async def test_a_call_beyond_the_settlement_is_charged_once(
    store: QuotaStore, names: Names
) -> None:
    """A twin's call (the job ran again under the same reservation) or a swept one: charged on
    top of the settled reservation, once per call id; the calls the reconcile covered, never."""
    tpm = bucket(names, "tpm", 500, 10_000, "tokens")
    assert isinstance(await store.reserve("job-1", [tpm], 30), Reserved)
    await store.reconcile("job-1", {"tokens": 320}, calls=["job-1:1:a"])
    assert await store.usage(tpm.key) == 320
    assert not await store.charge("job-1", "job-1:1:a", {"tokens": 320})  # the same call again
    assert await store.charge("job-1", "job-1:1:b", {"tokens": 300})  # the twin's call
    assert not await store.charge("job-1", "job-1:1:b", {"tokens": 300})
    assert not await store.charge("unknown", "x", {"tokens": 1})
    assert await store.usage(tpm.key) == 620


async def test_release_returns_everything(store: QuotaStore, names: Names, redis: Redis) -> None:
    rpm = bucket(names, "rpm", 1, 10)
    usd = bucket(names, "usd", 7_000, 100_000, "usd_nanos")
    assert isinstance(await store.reserve("keep", [rpm], 30), Reserved)
    assert isinstance(await store.reserve("job-1", [rpm, usd], 30), Reserved)
    assert await counters(store, rpm, usd) == [2, 7_000]
    settled = await store.release("job-1")
    assert settled.previous is ReservationState.HELD
    assert await counters(store, rpm, usd) == [1, 0]
    assert await store.state("job-1") is ReservationState.RELEASED
    assert (await store.release("job-1")).previous is ReservationState.RELEASED
    assert await counters(store, rpm, usd) == [1, 0]
    assert await holds(redis, names) == {"keep"}


async def test_expire_holds_once_with_two_sweepers(
    redis: Redis, names: Names, clients: list[Redis]
) -> None:
    other = Redis.from_url(REDIS_URL, decode_responses=True)
    clients.append(other)
    sweepers = [
        QuotaStore(redis, names, sweep_batch=7),
        QuotaStore(other, names, sweep_batch=7),
    ]
    store = sweepers[0]
    rpm = bucket(names, "rpm", 1, 1_000)
    tpm = bucket(names, "tpm", 10, 100_000, "tokens")
    assert isinstance(await store.reserve("long", [bucket(names, "rpm", 7, 1_000)], 60), Reserved)
    for i in range(50):
        assert isinstance(await store.reserve(f"dies-{i}", [rpm, tpm], 0.2), Reserved)
    assert await counters(store, rpm, tpm) == [57, 500]
    assert await store.expire_holds() == 0  # not yet due

    await asyncio.sleep(0.3)
    returned = await asyncio.gather(*(s.expire_holds() for s in sweepers * 3))
    assert sum(returned) == 50
    # A double refund would show below 7: the long hold's requests are still charged.
    assert await counters(store, rpm, tpm) == [7, 0]
    assert await holds(redis, names) == {"long"}
    assert await store.state("dies-3") is ReservationState.EXPIRED
    assert await store.expire_holds() == 0

    # The job ran after all: its late reconcile charges what it used.
    late = await store.reconcile("dies-3", {"tokens": 42})
    assert late.previous is ReservationState.EXPIRED
    assert await counters(store, rpm, tpm) == [8, 42]
    assert await store.state("dies-3") is ReservationState.RECONCILED
    assert (await store.reconcile("dies-3", {"tokens": 42})).previous is ReservationState.RECONCILED
    assert await counters(store, rpm, tpm) == [8, 42]
    # Released after expiry: nothing more to give back or charge.
    assert (await store.release("dies-4")).previous is ReservationState.EXPIRED
    assert await counters(store, rpm, tpm) == [8, 42]


async def test_expire_holds_with_explicit_clock_and_extend(store: QuotaStore, names: Names) -> None:
    rpm = bucket(names, "rpm", 1, 10)
    now = time.time()
    assert isinstance(await store.reserve("a", [rpm], 5, now=now), Reserved)
    assert isinstance(await store.reserve("b", [rpm], 5, now=now), Reserved)
    assert await store.extend("b", 100, now=now) == pytest.approx(now + 100, abs=0.01)
    assert await store.expire_holds(now=now + 4) == 0
    assert await store.expire_holds(now=now + 6) == 1
    assert await counters(store, rpm) == [1]
    assert await store.extend("a", 100) is None  # expired: no longer held
    assert await store.expire_holds(now=now + 101) == 1
    assert await counters(store, rpm) == [0]


async def test_an_ended_window_is_never_resurrected(redis: Redis, names: Names) -> None:
    store = QuotaStore(redis, names, margin_s=0)
    tpm = bucket(names, "tpm", 100, 1_000, "tokens", expires_in=0.3)
    assert isinstance(await store.reserve("ran", [tpm], 30), Reserved)
    assert isinstance(await store.reserve("died", [tpm], 0.2), Reserved)
    assert isinstance(await store.reserve("late", [tpm], 0.2), Reserved)
    assert await store.usage(tpm.key) == 300
    deadline = time.monotonic() + 3
    while await redis.exists(tpm.key):
        assert time.monotonic() < deadline, "the counter outlived its window"
        await asyncio.sleep(0.05)

    assert (await store.reconcile("ran", {"tokens": 900})).previous is ReservationState.HELD
    assert await store.expire_holds() == 2
    assert (await store.reconcile("late", {"tokens": 900})).previous is ReservationState.EXPIRED
    assert await store.release("died") is not None
    assert not await redis.exists(tpm.key)
    assert await store.usage(tpm.key) == 0


async def test_thresholds_reported_once_per_window_across_stores(
    redis: Redis, names: Names, clients: list[Redis]
) -> None:
    other = Redis.from_url(REDIS_URL, decode_responses=True)
    clients.append(other)
    a, b = QuotaStore(redis, names), QuotaStore(other, names)

    def rpd(amount: int, window_id: str = "d1") -> Bucket:
        return bucket(names, "rpd", amount, 100, window_id=window_id)

    async def crossed(store: QuotaStore, rid: str, amount: int, window_id: str = "d1") -> Any:
        result = await store.reserve(rid, [rpd(amount, window_id)], 30)
        assert isinstance(result, Reserved)
        return [(c.threshold, c.used) for c in result.crossed]

    assert await crossed(a, "1", 79) == []
    assert await crossed(b, "2", 1) == [(80, 80)]
    assert await crossed(a, "3", 10) == []
    # Falling below and rising again is not a new crossing in the same window.
    await a.release("3")
    assert await crossed(a, "4", 10) == []
    assert await crossed(a, "5", 5) == [(95, 95)]
    assert await crossed(b, "6", 5) == []
    assert await a.crossed([rpd(0)]) == ()
    assert await b.crossed([rpd(0)]) == ()

    # A new window reports again; one jump can cross both thresholds.
    result = await b.reserve("7", [rpd(96, "d2")], 30)
    assert isinstance(result, Reserved)
    assert result.crossed == (
        ThresholdCrossed("key team-a rpd", 80, 96, 100, rpd(0, "d2").key),
        ThresholdCrossed("key team-a rpd", 95, 96, 100, rpd(0, "d2").key),
    )
    marker = await redis.pttl(f"{rpd(0, 'd2').key}:alert:80")
    assert 0 < marker <= await redis.pttl(rpd(0, "d2").key) + 1_000


async def test_thresholds_from_reconcile_and_concurrent_reservers(
    redis: Redis, names: Names, clients: list[Redis]
) -> None:
    other = Redis.from_url(REDIS_URL)
    clients.append(other)
    a, b = QuotaStore(redis, names), QuotaStore(other, names)
    tpd = bucket(names, "tpd", 10, 100, "tokens")
    assert isinstance(await a.reserve("r", [tpd], 30), Reserved)
    settled = await b.reconcile("r", {"tokens": 85})
    assert [(c.label, c.threshold, c.used, c.limit) for c in settled.crossed] == [
        ("key team-a tpd", 80, 85, 100)
    ]

    rpm = bucket(names, "rpm", 1, 100)
    results = await asyncio.gather(*((a, b)[i % 2].reserve(f"c{i}", [rpm], 30) for i in range(120)))
    reports = [c.threshold for r in results if isinstance(r, Reserved) for c in r.crossed]
    assert sorted(reports) == [80, 95]
    assert sum(isinstance(r, Reserved) for r in results) == 100
    assert await a.usage(rpm.key) == 100


def test_money_in_nanos_is_the_ledgers_precision() -> None:
    # A priced call (numeric(18, 9) in the ledger) converts exactly: no per-call rounding up.
    assert usd_to_nanos(Decimal("0.000001350")) == 1_350
    assert usd_to_nanos(Decimal("0.000000001")) == 1
    assert usd_to_nanos(Decimal("0.0000000015")) == 2  # an estimate's extra digits round up
    assert usd_to_nanos(Decimal("0.0000000015"), rounding="ROUND_HALF_EVEN") == 2
    assert usd_to_nanos(Decimal("0.0000000014"), rounding="ROUND_HALF_EVEN") == 1
    assert usd_to_nanos(Decimal("12.5")) == 12_500_000_000
    assert nanos_to_usd(12_345) == Decimal("0.000012345")

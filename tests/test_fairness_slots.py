"""PrioritySlots and lanes: the in-process half of fairness."""

from __future__ import annotations

import asyncio

from broker.core.limits import KeyConfig
from broker.state.fairness import PrioritySlots, lane_for

SHA = "0" * 64


async def test_waiters_are_served_by_priority_then_arrival_and_never_over_capacity() -> None:
    slots = PrioritySlots(2)
    order: list[str] = []
    peak = 0
    gate = asyncio.Event()

    async def job(name: str, priority: int) -> None:
        nonlocal peak
        async with slots.slot(priority):
            peak = max(peak, slots.busy)
            order.append(name)
            await gate.wait()

    first = [asyncio.create_task(job(f"run{i}", 0)) for i in range(2)]
    await asyncio.sleep(0)
    waiting = [("low-a", 1), ("high-a", 8), ("low-b", 1), ("high-b", 8), ("mid", 5)]
    tasks = [asyncio.create_task(job(n, p)) for n, p in waiting]
    await asyncio.sleep(0.01)
    assert order == ["run0", "run1"]
    gate.set()
    await asyncio.gather(*first, *tasks)
    assert order[2:] == ["high-a", "high-b", "mid", "low-a", "low-b"]
    assert peak == 2
    assert slots.busy == 0


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    slots = PrioritySlots(1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with slots.slot(0):
            await gate.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(hold())
    after = asyncio.create_task(hold())
    await asyncio.sleep(0)
    doomed.cancel()
    gate.set()
    await asyncio.gather(holder, after)
    assert slots.busy == 0


def test_lanes_are_stable_per_consumer_and_anonymous_is_lane_zero() -> None:
    a1 = KeyConfig(id="a1", key_sha256=SHA, consumer="team-a")
    a2 = KeyConfig(id="a2", key_sha256="1" * 64, consumer="team-a")
    b = KeyConfig(id="b", key_sha256="2" * 64, consumer="team-b")
    assert lane_for(None, 8) == 0
    assert lane_for(a1, 1) == 0
    assert lane_for(a1, 8) == lane_for(a2, 8) != 0
    assert 1 <= lane_for(b, 8) < 8
    assert {lane_for(KeyConfig(id=f"k{i}", key_sha256=SHA), 8) for i in range(50)} == set(
        range(1, 8)
    )

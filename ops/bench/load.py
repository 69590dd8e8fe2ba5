"""Closed-loop load: keep N calls in flight until a count is done or a time cap passes."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Run:
    """What one load run measured. Latencies are end-to-end as the producer saw them."""

    name: str
    jobs: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(p) - 1]

    @classmethod
    def merged(cls, name: str, runs: list[Run]) -> Run:
        """Rounds of one side as one run: their jobs over their summed time."""
        merged = cls(name)
        for run in runs:
            merged.jobs += run.jobs
            merged.errors += run.errors
            merged.seconds += run.seconds
            merged.latencies_ms += run.latencies_ms
        merged.extra["rounds"] = len(runs)
        merged.extra["capped"] = any(run.extra.get("capped") for run in runs)
        return merged

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_ms")
        data.update(
            per_second=round(self.per_second, 1),
            p50_ms=round(self.percentile(50), 2),
            p95_ms=round(self.percentile(95), 2),
            p99_ms=round(self.percentile(99), 2),
        )
        data["seconds"] = round(self.seconds, 2)
        return data


async def drive(
    name: str,
    call: Callable[[int], Awaitable[bool]],
    *,
    total: int,
    in_flight: int,
    max_seconds: float,
    pause_s: float = 0.0,
) -> Run:
    """Run ``call(i)`` for i in 0..total-1 with ``in_flight`` at once; ``call`` returns success.
    ``pause_s``: each lane waits this long before each call, outside the call's latency."""
    run = Run(name)
    counter = iter(range(total))
    deadline = time.monotonic() + max_seconds

    async def lane() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            if pause_s:
                await asyncio.sleep(pause_s)
            started = time.perf_counter()
            try:
                ok = await call(i)
            except Exception:
                ok = False
            if ok:
                run.jobs += 1
                run.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                run.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    run.seconds = time.perf_counter() - started
    run.extra["capped"] = time.monotonic() > deadline
    return run

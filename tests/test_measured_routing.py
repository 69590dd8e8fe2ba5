"""Routing on measured provider state (``broker.state.provider_stats``): the ``fastest`` policy
moves traffic to the provider measured faster, and a CEL rule on ``provider.error_rate`` turns
jobs away from a provider once its calls start failing. Two real mock provider processes,
the pipeline in this loop, the stats through the session's Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from broker.client import SwitchyardClient
from broker.core.config import load_config
from broker.core.names import Names
from broker.state.provider_stats import (
    MIN_CALLS,
    NEVER_ANSWERED_MS,
    Outcome,
    StatsReader,
    StatsRecorder,
    summarize,
)
from schemas import JobResult, JobStatus
from tests.conftest import AMQP_URL, MockProvider, eventually, run_mock_provider

MODEL = {"m": {"input": 1, "output": 1}}


@pytest.fixture
def other_mock() -> Iterator[MockProvider]:
    with run_mock_provider() as mock:
        yield mock


def _config(tmp_path: Path, providers: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"providers": providers, **top}))
    return path


def _provider(provider_id: str, mock: MockProvider, **fields: Any) -> dict[str, Any]:
    return {
        "id": provider_id,
        "type": "openai",
        "base_url": f"{mock.base_url}/v1",
        "models": MODEL,
        "concurrency": 4,
        **fields,
    }


def test_only_answers_time_the_median_and_only_the_providers_failures_count_as_errors() -> None:
    fast_refusals = [(5.0, Outcome.OTHER)] * 40  # 429s answered in 5 ms
    answers = [(300.0, Outcome.ANSWERED)] * 10
    stats = summarize(fast_refusals + answers)
    assert stats is not None
    assert (stats.p50_latency_ms, stats.error_rate, stats.calls) == (300.0, 0.0, 10)
    failing = summarize([(2.0, Outcome.UNWELL)] * 8)
    assert failing is not None and failing.p50_latency_ms == NEVER_ANSWERED_MS
    assert (failing.error_rate, failing.status) == (1.0, "degraded")
    assert summarize(fast_refusals) is None  # says nothing of its health


async def test_a_reader_adds_only_what_was_pushed_since_its_last_read(
    redis: Redis, names: Names
) -> None:
    recorder, reader = StatsRecorder(redis, names), StatsReader(redis, names)
    pair = [("p", "m")]
    assert await reader.read(pair) == {}
    for latency in (100.0, 100.0, 100.0):
        recorder.record("p", "m", latency, Outcome.ANSWERED)
    await recorder.flush()
    first = (await reader.read(pair))["p"].models["m"]
    assert (first.calls, first.p50_latency_ms) == (3, 100.0)
    for _ in range(4):
        recorder.record("p", "m", 300.0, Outcome.ANSWERED)
    recorder.record("p", "m", 5.0, Outcome.UNWELL)
    await recorder.flush()
    again = (await reader.read(pair))["p"].models["m"]
    assert (again.calls, again.errors, again.p50_latency_ms) == (8, 1, 300.0)
    assert (await reader.read(pair))["p"].models["m"] == again  # nothing new: the same
    fresh = (await StatsReader(redis, names).read(pair))["p"].models["m"]
    assert fresh == again  # a new reader reads the whole list: the same figures


async def _ask(client: SwitchyardClient, i: int) -> JobResult:
    prompt = [{"role": "user", "content": f"question {i}"}]
    return await client.complete(prompt, model="m", timeout_s=30)


async def test_fastest_moves_traffic_from_a_slow_provider_to_a_fast_one(
    tmp_path: Path, names: Names, mock: MockProvider, other_mock: MockProvider, pipeline: Any
) -> None:
    slow, fast = other_mock, mock
    slow.configure(latency_ms=300)
    fast.configure(latency_ms=5)
    # The slow one first in the file: with neither measured, config order sends it the first.
    path = _config(
        tmp_path,
        [_provider("slow", slow), _provider("fast", fast)],
        default_policy="fastest",
    )
    config = load_config(path)
    served: list[str | None] = []
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:

            async def fast_has_taken_over() -> bool:
                result = await _ask(client, len(served))
                assert result.status is JobStatus.SUCCEEDED, result.error
                served.append(result.provider)
                return served[-8:] == ["fast"] * 8

            await eventually(fast_has_taken_over, 30, "fastest to settle on the fast provider")
            slow_calls = slow.stats()["calls"]
            for i in range(10):
                result = await _ask(client, 1000 + i)
                assert result.provider == "fast"
    assert "slow" in served, "the slow provider was never measured: the test proves nothing"
    assert slow.stats()["calls"] == slow_calls  # it got none of the last ten


async def test_a_cel_rule_on_error_rate_turns_jobs_away_from_a_failing_provider(
    tmp_path: Path,
    names: Names,
    redis: Redis,
    mock: MockProvider,
    other_mock: MockProvider,
    pipeline: Any,
) -> None:
    flaky, steady = other_mock, mock
    # Its circuit would open after 5 failures in a row: set far off, so the rule is what acts.
    many = {"failures": 1000, "open_s": 1}
    path = _config(
        tmp_path,
        [
            _provider("flaky", flaky, priority=0, max_attempts=1, circuit=many),
            _provider("steady", steady, priority=1, max_attempts=1, circuit=many),
        ],
        default_policy="priority",
        rules=[{"name": "shun-failing", "when": "provider.error_rate > 0.5", "action": "deny"}],
    )
    config = load_config(path)
    async with pipeline(config):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        async with client:
            first = await _ask(client, 0)
            assert [a.provider for a in first.attempts] == ["flaky"]  # healthy: it is first
            flaky.configure(error_rate=1.0)
            for i in range(MIN_CALLS):  # each fails on flaky, then fails over to steady
                result = await _ask(client, 1 + i)
                assert result.status is JobStatus.SUCCEEDED
                assert [a.provider for a in result.attempts] == ["flaky", "steady"]

            async def measured_failing() -> bool:
                stats = await StatsReader(redis, names).read([("flaky", "m")])
                return "flaky" in stats and stats["flaky"].overall.error_rate > 0.5

            await eventually(measured_failing, 10, "flaky's failures to reach Redis")

            async def turned_away() -> bool:
                result = await _ask(client, 100)
                return [a.provider for a in result.attempts] == ["steady"]

            # The scheduler's snapshot is at most a second behind Redis.
            await eventually(turned_away, 10, "the rule to deny flaky")
            calls = flaky.stats()["calls"]
            for i in range(5):
                result = await _ask(client, 200 + i)
                assert [a.provider for a in result.attempts] == ["steady"]
                assert result.provider == "steady"
    assert flaky.stats()["calls"] == calls  # denied: not called again

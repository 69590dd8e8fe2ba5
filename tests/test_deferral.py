"""Deferral: a job with ``defer: true`` and a deadline waits, parked, for a cheaper hour (a
discount window opening, a spent free tier resetting) that comes early enough to finish before
its deadline, and is charged that hour's price, its result saying what the wait saved; one whose
deadline falls before the cheaper hour is served at once. Pure decisions first, then the real
pipeline against a discount window that opens within the next minute or so."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker.client import SwitchyardClient, make_job
from broker.core.config import Config, load_config, parse_config
from broker.core.limits import Discount
from broker.core.names import Names
from broker.core.pricing import cost_usd
from broker.scheduler.candidates import ProviderState
from broker.scheduler.deferral import FINISH_MARGIN_S, defer_until
from broker.scheduler.routing import Router
from broker.transport.amqp import PARK_DELAYS_S
from schemas import CompletionJob
from tests.conftest import AMQP_URL, MockProvider, queue_depth, write_config

NOON = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)  # a Thursday
HALF_PRICE_AT_14 = {"start": "14:00", "end": "16:00", "multiplier": "0.5"}


def config(*discounts: dict[str, str], free_tier: dict[str, Any] | None = None) -> Config:
    spec = {"input": "2", "output": "8", "discounts": list(discounts)}
    provider: dict[str, Any] = {
        "id": "p",
        "type": "openai",
        "base_url": "http://127.0.0.1:1/v1",
        "models": {"m": spec},
    }
    if free_tier is not None:
        provider["free_tier"] = free_tier
    return parse_config(json.dumps({"providers": [provider]}), "test.json")


def job(deadline: datetime | None, defer: bool = True) -> CompletionJob:
    return CompletionJob.model_validate(
        {
            "job_id": "j",
            "model": "m",
            "messages": [{"role": "user", "content": "wait for the cheap hour"}],
            "params": {"max_tokens": 50},
            "deadline": deadline,
            "defer": defer,
        }
    )


def until(cfg: Config, j: CompletionJob, states: dict[str, ProviderState] | None = None) -> Any:
    decision = Router(cfg).route(j, key=None, states=states or {}, now=NOON, rr_counter=0)
    return defer_until(j, decision, states or {}, cfg, NOON)


def test_a_job_waits_for_the_next_discount_window_its_deadline_allows() -> None:
    cfg = config(HALF_PRICE_AT_14)
    assert until(cfg, job(NOON + timedelta(hours=6))) == NOON + timedelta(hours=2)
    # The window must open FINISH_MARGIN_S before the deadline, or the job goes now.
    edge = NOON + timedelta(hours=2, seconds=FINISH_MARGIN_S)
    assert until(cfg, job(edge)) == NOON + timedelta(hours=2)
    assert until(cfg, job(edge - timedelta(seconds=1))) is None


def test_no_wait_without_defer_a_cheaper_hour_or_inside_the_window() -> None:
    assert until(config(HALF_PRICE_AT_14), job(NOON + timedelta(hours=6), defer=False)) is None
    assert until(config(), job(NOON + timedelta(hours=6))) is None
    # Already in a window as cheap as any later one: served now.
    assert (
        until(config({**HALF_PRICE_AT_14, "start": "11:00"}), job(NOON + timedelta(hours=30)))
        is None
    )


def test_a_deeper_discount_later_is_waited_for_a_shallower_one_is_not() -> None:
    now_cheap = {"start": "11:00", "end": "13:00", "multiplier": "0.8"}
    assert until(
        config(now_cheap, HALF_PRICE_AT_14), job(NOON + timedelta(hours=6))
    ) == NOON + timedelta(hours=2)
    later_dearer = {"start": "14:00", "end": "16:00", "multiplier": "0.9"}
    assert (
        until(
            config({**now_cheap, "multiplier": "0.5"}, later_dearer), job(NOON + timedelta(hours=6))
        )
        is None
    )


def test_a_spent_free_tier_is_waited_for_until_it_resets() -> None:
    cfg = config(free_tier={"requests_per_day": 10})
    reset = (NOON + timedelta(hours=12)).timestamp()
    spent = {"p": ProviderState(free_remaining=False, free_resets_at=reset)}
    assert until(cfg, job(NOON + timedelta(hours=20)), spent) == NOON + timedelta(hours=12)
    assert until(cfg, job(NOON + timedelta(hours=6)), spent) is None


def test_defer_needs_a_deadline() -> None:
    with pytest.raises(ValueError, match="defer: needs a deadline"):
        job(None)


@pytest.mark.parametrize(
    ("window", "after", "opens"),
    [
        ({"start": "14:00", "end": "16:00"}, NOON, NOON + timedelta(hours=2)),
        ({"start": "11:00", "end": "13:00"}, NOON, NOON + timedelta(hours=23)),  # in it: next day
        (
            {"start": "22:00", "end": "06:00", "weekdays": [5]},
            NOON,
            NOON + timedelta(days=2, hours=10),
        ),
        (
            {"start": "14:00", "end": "16:00", "timezone": "Asia/Shanghai"},
            NOON,
            NOON + timedelta(hours=18),
        ),
    ],
)
def test_a_window_knows_when_it_next_opens(
    window: dict[str, Any], after: datetime, opens: datetime
) -> None:
    discount = Discount.model_validate({"multiplier": "0.5", **window})
    assert discount.next_start(after, ZoneInfo("UTC")) == opens


# --- the real pipeline ---------------------------------------------------------------------


def _next_window(now: datetime) -> tuple[datetime, str, str]:
    """A 10-minute window opening at a minute boundary at least 15 s from now (HH:MM, UTC)."""
    opens = (now + timedelta(seconds=75)).replace(second=0, microsecond=0)
    if (opens - now).total_seconds() > 75:
        opens -= timedelta(minutes=1)
    return opens, f"{opens:%H:%M}", f"{opens + timedelta(minutes=10):%H:%M}"


async def test_a_deferred_job_is_called_in_the_window_at_its_price_the_other_at_once(
    pipeline: Any, names: Names, mock: MockProvider, tmp_path: Path, amqp: Any
) -> None:
    now = datetime.now(UTC)
    opens, start, end = _next_window(now)
    window = {"start": start, "end": end, "multiplier": "0.5"}
    models = {"m": {"input": 2, "output": 8, "discounts": [window]}}
    path = write_config(tmp_path / "defer.yaml", mock, [{"id": "one", "models": models}])
    cfg = load_config(path)
    async with pipeline(cfg):
        client = await SwitchyardClient.connect(AMQP_URL, namespace=names.namespace)
        try:
            queue = await client.open_results("defer")
            ask = [{"role": "user", "content": "deferred question"}]
            waits = make_job(ask, model="m", deadline=now + timedelta(hours=1)).model_copy(
                update={"defer": True}
            )
            hurried = make_job(ask, model="m", deadline=opens + timedelta(minutes=2)).model_copy(
                update={"defer": True}
            )
            for j in (waits, hurried):
                await client.submit(j, results_queue=queue)
            results = {}
            parked_seen = 0
            async with asyncio.timeout(110):
                async for result in client.results(queue):
                    results[result.job_id] = (result, datetime.now(UTC))
                    if len(results) == 1:  # the hurried one; the other must be parked now
                        depths = [await queue_depth(amqp, names.park(d)) for d in PARK_DELAYS_S]
                        parked_seen = sum(depths)
                    if len(results) == 2:
                        break
        finally:
            await client.close()
    first, first_at = results[hurried.job_id]
    later, later_at = results[waits.job_id]
    assert first.status.value == later.status.value == "succeeded"
    assert first_at < opens and first.saved_usd is None
    assert parked_seen == 1, "the deferred job waits in a parking queue"
    assert later_at >= opens, "the deferred job was called before its window opened"
    spec = cfg.price("one", "m")
    for result, multiplier in ((first, Decimal(1)), (later, Decimal("0.5"))):
        assert result.usage is not None
        assert result.cost_usd == cost_usd(
            spec, result.usage.prompt_tokens, result.usage.completion_tokens, multiplier
        )
    assert later.usage is not None
    full = cost_usd(spec, later.usage.prompt_tokens, later.usage.completion_tokens)
    assert later.saved_usd == full - later.cost_usd and later.saved_usd > 0

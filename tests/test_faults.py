"""Chaos at small sizes (issue #15): each fault of ``ops/bench/faults.py`` lands mid-run, with
calls in flight, on Switchyard's processes (real ones) and the real servers, 400 persistent jobs
each. Every run must end with every job answered exactly once at the raw results queue, each
succeeded unless the fault is the provider's own, ``usage`` holding one row per call the mock
served, and the key's Redis counter equal to the ledger. The harness (``ops/bench/chaos.py``)
gives each run its own namespace, database and mock provider. The tests that stop a server skip
unless it is this machine's, and start it again, and wait for it, whatever happens.

The full sizes: ``ops/bench/faults.py`` (its README section)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from broker.state.answers import CLAIM_S
from tests.conftest import REPO, _need

sys.path.insert(0, str(REPO / "ops" / "bench"))

from chaos import SMALL
from faults import FAULTS, Report, row, run_fault, unavailable


@pytest.fixture(autouse=True)
def _servers() -> None:
    _need("RabbitMQ", "127.0.0.1", 5672)
    _need("PostgreSQL", "127.0.0.1", 5432)
    _need("Redis", "127.0.0.1", 6379)


async def chaos(fault: str, out: Path) -> Report:
    if why := unavailable(FAULTS[fault].server):
        pytest.skip(why)
    report = await run_fault(fault, SMALL, out)
    print("\n" + " | ".join(f"{column}: {value}" for column, value in row(report).items()))
    assert report.in_flight > 0, "the fault did not land while calls were in flight"
    return report


def check(report: Report, *, exact_usage: bool = True, late_answers: bool = False) -> None:
    """Every invariant, whatever the fault. ``late_answers``: a job may reach the raw results
    queue twice, the second at least a claim's life (``CLAIM_S``) later: a worker killed while
    its result's confirm was in flight leaves the claim pending and the job answers again once
    it lapses (at least once; ``SwitchyardClient.results`` drops the second)."""
    b = report.books
    assert report.answered == report.jobs, f"{report.jobs - report.answered} jobs unanswered"
    assert set(report.failed) <= FAULTS[report.fault].allowed, report.failed
    if not FAULTS[report.fault].allowed:
        assert report.succeeded == report.jobs
    assert b.unsettled_calls == 0
    if exact_usage:
        assert b.usage_rows == b.mock_served
    else:  # every row more than the mock served is a call swept at its reservation
        assert b.mock_served <= b.usage_rows <= b.mock_served + b.swept_rows
    assert b.epoch
    if late_answers:
        assert all(after >= CLAIM_S - 2 for after in report.duplicate_after_s), report.findings
    else:
        assert report.duplicates == 0, "a job was answered twice at the results queue"
    assert b.counter == b.ledger_tokens > 0 and b.holds == 0, report.findings


async def test_a_worker_killed_while_answering_loses_no_job(tmp_path: Path) -> None:
    """Killed with calls in flight and results going out: RabbitMQ hands its jobs to the new
    worker; the calls it made are swept into ``usage`` at their reservations. A call recorded
    as started whose request had not reached the mock is counted too (the ledger must hold
    every call the provider may bill), hence the bound rather than an equality."""
    report = await chaos("worker", tmp_path)
    assert report.books.swept_rows > 0
    check(report, exact_usage=False, late_answers=True)


async def test_a_scheduler_killed_mid_run_loses_no_job_and_answers_none_twice(
    tmp_path: Path,
) -> None:
    """Jobs it forwarded and had not acked are forwarded again by the new scheduler (twins
    under a new reservation each); one result per job reaches the results queue, and a twin
    found answered gives its hold back."""
    check(await chaos("scheduler", tmp_path))


async def test_an_accountant_killed_mid_run_leaves_the_ledger_whole(tmp_path: Path) -> None:
    check(await chaos("accountant", tmp_path))


async def test_a_broker_restart_mid_run_loses_no_persistent_job(tmp_path: Path) -> None:
    report = await chaos("rabbitmq", tmp_path)
    assert report.longest_gap_s >= SMALL.rabbitmq_down_s  # the results did stop
    check(report)


async def test_postgres_away_delays_the_ledger_not_the_answers(tmp_path: Path) -> None:
    report = await chaos("postgres", tmp_path)
    assert report.fault_s >= SMALL.postgres_down_s
    check(report)


async def test_redis_restarted_empty_mid_run_has_its_counter_rebuilt_to_the_ledger(
    tmp_path: Path,
) -> None:
    report = await chaos("redis", tmp_path)
    # Batch jobs waited for Redis: none was served while it was away. The calls in flight when
    # it stopped (35 ms at the mock) still answer in the outage's first moments, and the first
    # jobs after it may answer within 0.05 s of its return: a second is left for that tail.
    assert report.longest_gap_s >= SMALL.redis_down_s - 1.0
    check(report)


async def test_provider_errors_fail_only_what_retries_could_not_save(tmp_path: Path) -> None:
    report = await chaos("provider", tmp_path)
    errors = sum(n for status, n in report.books.by_status.items() if int(status) >= 400)
    assert errors > 0  # the mock did fail calls
    assert report.succeeded + sum(report.failed.values()) == report.jobs
    assert report.succeeded >= report.jobs * 0.8  # retries saved most of them
    check(report)

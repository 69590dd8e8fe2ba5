"""A stored batch survives kill -9 of the scheduler, the worker, the accountant and the gateway
(its batch runner), and a RabbitMQ restart, each landing in turn while its lines are in flight,
with real processes and servers (``ops/bench/batches.py``, run small here): it ends completed,
every custom_id once across its output and error files, and ``usage`` holds one row per call
the mock served (a row more only for a call swept at its reservation: recorded as started by a
worker killed before its request may have left, as in ``tests/test_faults.py``)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REPO, _need

sys.path.insert(0, str(REPO / "ops" / "bench"))

from batches import FAULTS, run_batch_faults
from chaos import SMALL
from faults import RABBITMQ, unavailable


async def test_a_batch_survives_every_process_killed_and_a_broker_restart(tmp_path: Path) -> None:
    for server, port in (("RabbitMQ", 5672), ("PostgreSQL", 5432), ("Redis", 6379)):
        _need(server, "127.0.0.1", port)
    if why := unavailable(RABBITMQ):
        pytest.skip(why)
    sizes = replace(SMALL, latency_ms=60.0, concurrency=16)
    report = await run_batch_faults(1_500, FAULTS, tmp_path, sizes, in_flight=150)
    print(report)
    assert report.status == "completed"
    assert report.answered_once, "a custom_id is missing from the files, or there twice"
    assert report.output_lines == 1_500 and report.error_lines == 0, report.error_codes
    books = report.books
    assert books.unsettled_calls == 0 and books.mock_served > 0
    assert books.mock_served <= books.usage_rows <= books.mock_served + books.swept_rows, books
    assert report.findings == []

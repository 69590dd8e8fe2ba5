"""Cost reports against the real ledger: ``switchyard usage --csv`` sums to the ledger over
partial days at both ends, with the previous period beside it; budgets against what was spent;
the PDF renders; ``GET /v1/usage`` gives the same figures to a key, and only its own (the
rollup itself: ``test_usage_rollup.py``).

Every test writes rows in a stretch of the past of its own (the session's database is shared),
under key ids carrying the test's namespace.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from broker.core.config import Config, load_config
from broker.core.db import make_engine
from broker.core.names import Names
from broker.core.usage_report import build_report, report_query
from broker.core.windows import window
from tests.conftest import REPO, MockProvider, process_env, write_config

PARIS = ZoneInfo("Europe/Paris")
SECRET_A = "sk-usage-report-a"
SECRET_B = "sk-usage-report-b"
INSERT = (
    "INSERT INTO usage (call_id, job_id, attempt, provider, model, public_model, prompt_tokens,"
    " completion_tokens, total_tokens, cost_usd, key_id, task_type, consumer, occurred_at)"
    " VALUES ($1, $2, 1, $3, $4, $4, $5, $6, $5::int + $6::int, $7, $8, $9, $10, $11)"
)
LEDGER = """SELECT {groups}, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens,
  sum(completion_tokens) AS completion_tokens, coalesce(sum(cost_usd), 0) AS cost_usd,
  count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_calls
FROM usage WHERE occurred_at >= $1 AND occurred_at < $2 AND call_id LIKE $3 GROUP BY {groups}"""


def _rows(prefix: str, keys: list[str | None], start: datetime, days: int, n: int) -> list[Any]:
    """``n`` calls spread over ``days`` from ``start``: several providers, models, task types
    and consumers, some unpriced."""
    rng = random.Random(prefix)
    rows = []
    for i in range(n):
        cost = None if i % 9 == 0 else Decimal(rng.randrange(1, 10**7)) / 10**9
        at = start + timedelta(seconds=rng.randrange(days * 86400))
        rows.append(
            (
                f"{prefix}-{i}",
                f"{prefix}-job-{i}",
                rng.choice(["alpha", "beta"]),
                rng.choice(["m-small", "m-large"]),
                rng.randrange(1, 5000),
                rng.randrange(0, 2000),
                cost,
                rng.choice(keys),
                rng.choice([None, "chat", "coding"]),
                rng.choice([None, "user-1", "user-2", "user-3"]),
                at,
            )
        )
    return rows


async def _ledger(
    pg: asyncpg.Connection, groups: str, start: datetime, end: datetime, prefix: str
) -> dict[tuple[Any, ...], dict[str, Any]]:
    width = len(groups.split(","))
    found = await pg.fetch(LEDGER.format(groups=groups), start, end, f"{prefix}-%")
    return {tuple(r)[:width]: dict(r) for r in found}


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "usage", *args],
        cwd=REPO,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


@pytest.fixture
def paris_config(tmp_path: Path, mock: MockProvider) -> Path:
    return write_config(tmp_path / "usage.yaml", mock, [{"id": "mock"}], timezone="Europe/Paris")


async def test_the_csv_sums_to_the_ledger_with_partial_days_and_the_previous_period(
    pg: asyncpg.Connection, names: Names, database_url: str, paris_config: Path
) -> None:
    prefix = f"{names.namespace}-csv"
    keys: list[str | None] = [f"{prefix}-k{i}" for i in range(3)] + [None]
    await pg.executemany(INSERT, _rows(prefix, keys, datetime(2012, 2, 20, tzinfo=UTC), 22, 900))
    env = process_env(names, database_url, paris_config)
    # Partial days at both ends, in Paris: 2012-03-02 07:30 +01:00 to 2012-03-09 16:45 +01:00.
    since, until = "2012-03-02T07:30", "2012-03-09T16:45"
    start = datetime(2012, 3, 2, 7, 30, tzinfo=PARIS)
    end = datetime(2012, 3, 9, 16, 45, tzinfo=PARIS)
    before = start - (end - start)
    for by, groups in (("key,task_type", "key_id, task_type"), ("consumer", "consumer")):
        text = await asyncio.to_thread(
            _cli, env, "--since", since, "--until", until, "--by", by, "--csv", "-"
        )
        lines = list(csv.DictReader(io.StringIO(text)))
        now = await _ledger(pg, groups, start, end, prefix)
        previous = await _ledger(pg, groups, before, start, prefix)
        dims = by.split(",")
        assert len(lines) == len(now.keys() | previous.keys()) >= 4
        for line in lines:
            group = tuple(line[d] or None for d in dims)
            mine, theirs = now.get(group), previous.get(group)
            assert int(line["calls"]) == (mine["calls"] if mine else 0)
            assert Decimal(line["cost_usd"]) == (mine["cost_usd"] if mine else 0)
            assert int(line["unpriced_calls"]) == (mine["unpriced_calls"] if mine else 0)
            assert int(line["previous_calls"]) == (theirs["calls"] if theirs else 0)
            assert Decimal(line["previous_cost_usd"]) == (theirs["cost_usd"] if theirs else 0)
        for column in ("calls", "prompt_tokens", "completion_tokens", "unpriced_calls"):
            assert sum(int(line[column]) for line in lines) == sum(g[column] for g in now.values())
        total = sum(Decimal(line["cost_usd"]) for line in lines)
        assert total == sum(g["cost_usd"] for g in now.values()) > 0


def _key(key_id: str, secret: str, **fields: Any) -> dict[str, Any]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest(), **fields}


async def test_a_month_so_far_beside_the_same_stretch_of_the_last_and_against_budgets(
    pg: asyncpg.Connection, names: Names, database_url: str, tmp_path: Path, mock: MockProvider
) -> None:
    prefix = f"{names.namespace}-budget"
    a, b = f"{prefix}-a", f"{prefix}-b"
    keys = [
        _key(a, SECRET_A, consumer="team", budgets={"usd_per_month": 2}),
        _key(b, SECRET_B, consumer="team"),
    ]
    config = load_config(
        write_config(
            tmp_path / "b.yaml",
            mock,
            [{"id": "mock"}],
            timezone="Europe/Paris",
            keys=keys,
            consumers={"team": {"budgets": {"usd_per_month": 5}}},
        )
    )

    def at(day: int, hour: int, month: int = 4) -> datetime:
        return datetime(2013, month, day, hour, tzinfo=PARIS)

    spends = [  # (key, when, cost)
        (a, at(1, 0), "0.25"),  # the month's first moment, in Paris (March 31st in UTC)
        (a, at(9, 23), "0.50"),
        (b, at(10, 11), "1.125"),
        (a, at(10, 13), "9"),  # after now: not yet
        (a, at(1, 0, 3), "0.5"),  # the previous month's stretch
        (b, at(10, 11, 3), "0.75"),
        (a, at(10, 13, 3), "7"),  # past the stretch's end
        (b, at(28, 12, 2), "3"),  # before the previous month
    ]
    await pg.executemany(
        INSERT,
        [
            (f"{prefix}-{i}", "j", "alpha", "m", 10, 5, Decimal(c), k, None, None, w)
            for i, (k, w, c) in enumerate(spends)
        ],
    )
    query = report_query(["key"], "month", None, None, config.zone, at(10, 12))
    assert query.current.start == at(1, 0) and query.previous.start == at(1, 0, 3)
    assert query.previous.end == at(10, 12, 3)
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            report = await build_report(conn, query, config)
    finally:
        await engine.dispose()
    rows = {r.group: r for r in report.rows}
    assert set(rows) == {(a,), (b,)}
    assert rows[(a,)].current.cost_usd == Decimal("0.75")
    assert rows[(a,)].previous.cost_usd == Decimal("0.5")
    assert rows[(a,)].delta_pct == 50.0
    assert rows[(b,)].current.cost_usd == Decimal("1.125")
    assert rows[(b,)].previous.cost_usd == Decimal("0.75")
    assert rows[(a,)].budget_usd == 2 and rows[(a,)].budget_used_pct == 37.5
    assert rows[(b,)].budget_usd is None
    budgets = [(u.scope, u.scope_id, u.budget_usd, u.spent_usd) for u in report.budgets]
    assert budgets == [
        ("key", a, Decimal(2), Decimal("0.75")),
        ("consumer", "team", Decimal(5), Decimal("1.875")),
    ]


async def test_the_pdf_report_renders(
    pg: asyncpg.Connection, names: Names, database_url: str, paris_config: Path, tmp_path: Path
) -> None:
    prefix = f"{names.namespace}-pdf"
    keys: list[str | None] = [f"{prefix}-k{i}" for i in range(4)]
    await pg.executemany(INSERT, _rows(prefix, keys, datetime(2012, 6, 1, tzinfo=UTC), 30, 300))
    pdf = tmp_path / "report.pdf"
    env = process_env(names, database_url, paris_config)
    page = tmp_path / "page"  # pdftoppm adds .png
    args = ("--since", "2012-06-10", "--until", "2012-06-20", "--by", "key", "--pdf", str(pdf))
    await asyncio.to_thread(_cli, env, *args)
    assert pdf.read_bytes().startswith(b"%PDF")
    await asyncio.to_thread(
        subprocess.run,
        ["pdftoppm", "-png", "-r", "50", "-f", "1", "-l", "1", "-singlefile", str(pdf), str(page)],
        check=True,
        timeout=60,
    )
    png = page.with_suffix(".png")
    assert png.stat().st_size > 5000
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[1] > pixels.shape[0] > 300  # a landscape page
    assert pixels.std() > 0.05  # text and a table, not a blank page


@pytest.fixture
async def two_keys(
    tmp_path: Path, mock: MockProvider, names: Names, gateway_in_front: Any
) -> AsyncIterator[tuple[str, Config]]:
    a, b = f"{names.namespace}-http-a", f"{names.namespace}-http-b"
    keys = [_key(a, SECRET_A, budgets={"usd_per_month": 100}), _key(b, SECRET_B)]
    config = load_config(write_config(tmp_path / "http.yaml", mock, [{"id": "mock"}], keys=keys))
    async with gateway_in_front(config) as url:
        yield url, config


def _client(url: str, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {secret}"}, timeout=30
    )


async def test_the_http_report_gives_a_key_its_own_figures_and_refuses_unknown_parameters(
    pg: asyncpg.Connection, names: Names, two_keys: tuple[str, Config]
) -> None:
    url, _ = two_keys
    prefix = f"{names.namespace}-http"
    a, b = f"{prefix}-a", f"{prefix}-b"
    await pg.executemany(
        INSERT, _rows(prefix, [a, b, None], datetime(2014, 6, 1, tzinfo=UTC), 20, 600)
    )
    span = {"since": "2014-06-05T06:00:00+00:00", "until": "2014-06-15T18:00:00+00:00"}
    start, end = (datetime.fromisoformat(span[k]) for k in ("since", "until"))
    ledger = await _ledger(pg, "key_id, model", start, end, prefix)
    async with _client(url, SECRET_A) as http:
        body = (await http.get("/v1/usage", params={**span, "by": "key,model"})).json()
        assert body["object"] == "switchyard.usage_report" and body["by"] == ["key", "model"]
        groups = {(g["group"]["key"], g["group"]["model"]): g for g in body["groups"]}
        assert set(groups) == {k for k in ledger if k[0] == a}  # its own key only
        for group, figures in groups.items():
            assert figures["calls"] == ledger[group]["calls"]
            assert Decimal(figures["cost_usd"]) == ledger[group]["cost_usd"]
        as_csv = await http.get(
            "/v1/usage", params={**span, "by": ["key", "model"], "format": "csv"}
        )
        assert as_csv.headers["content-type"].startswith("text/csv")
        lines = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert {(x["key"], x["model"]): Decimal(x["cost_usd"]) for x in lines} == {
            g: Decimal(f["cost_usd"]) for g, f in groups.items()
        }
        refused = await http.get("/v1/usage", params={**span, "colour": "red", "by": "key"})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert "colour" in error["message"] and error["param"] == "colour"
        assert (await http.get("/v1/usage", params={"by": "owner"})).status_code == 400
        both = await http.get("/v1/usage", params={"period": "day", "since": "2014-06-05"})
        assert both.status_code == 400 and both.json()["error"]["param"] == "period"
        ancient = await http.get("/v1/usage", params={"since": "0001-01-01"})
        assert ancient.status_code == 400 and ancient.json()["error"]["param"] == "since"
    async with _client(url, SECRET_B) as http:
        theirs = (await http.get("/v1/usage", params={**span, "by": "key"})).json()
        assert [g["group"]["key"] for g in theirs["groups"]] == [b]
    async with _client(url, "sk-nobody") as http:
        assert (await http.get("/v1/usage", params=span)).status_code == 401


async def test_the_http_report_shows_the_keys_budget_for_the_month(
    pg: asyncpg.Connection, names: Names, two_keys: tuple[str, Config]
) -> None:
    url, config = two_keys
    a = f"{names.namespace}-http-a"
    now = datetime.now(UTC)
    month = window("month", now, config.zone)
    at = month.start + (now - month.start) / 2  # inside this month, before now
    await pg.execute(
        INSERT, f"{a}-now", "j", "alpha", "m", 10, 5, Decimal("12.5"), a, None, None, at
    )
    async with _client(url, SECRET_A) as http:
        body = (await http.get("/v1/usage", params={"by": "key", "period": "month"})).json()
    assert body["period"] == "month"
    [budget] = body["budgets"]
    assert (budget["scope"], budget["id"], Decimal(budget["budget_usd"])) == ("key", a, 100)
    assert Decimal(budget["spent_usd"]) == Decimal("12.5") and budget["used_pct"] == 12.5
    [group] = body["groups"]
    assert Decimal(group["budget_usd"]) == 100 and group["budget_used_pct"] == 12.5

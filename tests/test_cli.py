"""``switchyard submit``: a batch file in, results JSONL and a Postgres-backed report out."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from broker.core.config import CircuitConfig, load_config
from broker.core.names import Names
from broker.state.circuits import Circuits
from tests.conftest import REDIS_URL, REPO, MockProvider, process_env, write_config


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        *args,
        cwd=REPO,
        env={**env, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_submit_writes_every_result_and_reports_usage_from_postgres(
    names: Names,
    config_file: Path,
    database_url: str,
    pipeline: Any,
    pg: asyncpg.Connection,
    mock: MockProvider,
    tmp_path: Path,
) -> None:
    batch = tmp_path / "batch.jsonl"
    lines = [
        {
            "job_id": f"{names.namespace}-cli-{i}",
            "model": "gpt-4o-mini",
            "priority": i % 10,
            "messages": [{"role": "user", "content": f"cli question {i}"}],
        }
        for i in range(12)
    ]
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "results.jsonl"
    async with pipeline(load_config(config_file)):
        code, output = await run_cli(
            process_env(names, database_url, config_file),
            "submit",
            str(batch),
            "--out",
            str(out),
            "--report",
        )
    assert code == 0, output
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["job_id"] for r in results) == sorted(line["job_id"] for line in lines)
    assert {r["status"] for r in results} == {"succeeded"}
    assert "12 of 12 jobs recorded in Postgres" in output
    totals = await pg.fetchrow(
        "SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c, sum(cost_usd) AS usd"
        " FROM usage WHERE job_id = ANY($1::text[])",
        [line["job_id"] for line in lines],
    )
    assert totals is not None
    assert totals["p"] == sum(r["usage"]["prompt_tokens"] for r in results)
    report_row = next(line for line in output.splitlines() if "│ mock" in line)
    cells = [cell.strip() for cell in report_row.split("│") if cell.strip()]
    assert cells == [
        "mock",
        "gpt-4o-mini",
        "12",
        str(totals["p"]),
        str(totals["c"]),
        f"{totals['usd']:.6f}",
    ]


async def test_submit_refuses_a_bad_line_before_sending_anything(
    names: Names, config_file: Path, database_url: str, tmp_path: Path, mock: MockProvider
) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        '{"messages": [{"role": "user", "content": "fine"}]}\n'
        '{"messages": [{"role": "robot", "content": "bad role"}]}\n'
    )
    code, output = await run_cli(
        process_env(names, database_url, config_file), "submit", str(batch)
    )
    assert code == 2
    assert f"{batch}:2: invalid fields: messages.0.role" in output.replace("\n", "")
    assert mock.stats()["calls"] == 0


def table_rows(shown: str) -> dict[str, str]:
    """A rich table's rows by their first cell."""
    return {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}


async def test_circuits_shows_each_providers_breaker_and_closes_one_on_request(
    names: Names, tmp_path: Path, database_url: str, mock: MockProvider, redis: Redis
) -> None:
    providers = [{"id": "steady"}, {"id": "tripped", "circuit": {"failures": 2, "open_s": 600}}]
    config_path = write_config(tmp_path / "p.yaml", mock, providers)
    env = {**process_env(names, database_url, config_path), "SWITCHYARD_REDIS_URL": REDIS_URL}
    breakers = Circuits(redis, names)
    assert await breakers.failed("tripped", CircuitConfig(failures=2, open_s=600), 2)
    code, shown = await run_cli(env, "circuits")
    assert code == 0, shown
    rows = table_rows(shown)
    assert "closed" in rows["steady"] and "open" in rows["tripped"]
    assert "59" in rows["tripped"]  # about 600 s left: 599.x

    code, shown = await run_cli(env, "circuits", "--close", "tripped")
    assert code == 0, shown
    assert await redis.exists(names.circuit("tripped")) == 0
    assert "closed" in table_rows(shown)["tripped"]

    code, shown = await run_cli(env, "circuits", "--close", "nobody")
    assert code == 2 and "no provider 'nobody'" in shown


async def test_models_prints_each_model_with_its_providers_capabilities_and_circuits(
    names: Names, tmp_path: Path, database_url: str, mock: MockProvider, redis: Redis
) -> None:
    seeing = {"input": 2, "output": 8, "context_window": 128000, "capabilities": {"vision": True}}
    providers = [
        {"id": "eyes", "models": {"gpt-4o": seeing}, "rpm": 600},
        {"id": "tripped", "models": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}},
    ]
    config_path = write_config(tmp_path / "p.yaml", mock, providers)
    env = {**process_env(names, database_url, config_path), "SWITCHYARD_REDIS_URL": REDIS_URL}
    assert await Circuits(redis, names).failed("tripped", CircuitConfig(failures=1), 1)
    code, shown = await run_cli(env, "models")
    assert code == 0, shown
    rows = table_rows(shown)
    cells = [cell.strip() for cell in rows["gpt-4o"].split("│")[1:-1]]
    assert cells == [
        "gpt-4o",
        "eyes/gpt-4o",
        "2/8",
        "128000",
        "stream,tools,json,vision",
        "conc 8 rpm 600",
        "closed",
    ]
    assert rows["gpt-4o-mini"].rstrip("│ ").endswith("open")


async def test_jobs_show_and_cancel_a_tracked_job(
    names: Names, tmp_path: Path, database_url: str, mock: MockProvider, redis: Redis
) -> None:
    from broker.state.job_states import JobStates

    config_path = write_config(tmp_path / "p.yaml", mock, [{"id": "p"}])
    env = {**process_env(names, database_url, config_path), "SWITCHYARD_REDIS_URL": REDIS_URL}
    states = JobStates(redis, names)
    for job_id in ("first", "second"):
        queued = await states.queued(
            job_id,
            "p",
            3,
            owner="team",
            est_cost_usd="0.002",
            model="m",
            deadline=None,
            again=False,
        )
        assert queued == "queued"
    code, shown = await run_cli(env, "jobs", "show", "second")
    assert code == 0, shown
    rows = table_rows(shown)
    assert (
        "queued" in rows["state"]
        and "1" in rows["position"]
        and "0.002" in rows["estimated cost (USD)"]
    )

    code, shown = await run_cli(env, "jobs", "cancel", "second")
    assert code == 0 and "cancelled" in shown
    assert not await states.start("second", "p")  # its worker will not call it
    assert await states.start("first", "p")
    code, shown = await run_cli(env, "jobs", "cancel", "first")
    assert code == 1 and "running" in shown

"""Stored batches through the official ``openai`` SDK, in front of the real pipeline: a file
uploaded, a batch created and polled to its end, its output and error files downloaded; every
custom_id answered once; invalid lines reported with their numbers; a cancel."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import AsyncOpenAI

from broker.core.config import Config, load_config
from broker.core.names import Names
from mock_provider import expected_completion
from tests.conftest import MockProvider, eventually, process_env, write_config
from tests.test_cli import run_cli

SECRET = "sk-batches-key"


@pytest.fixture
def batch_config(tmp_path: Path, mock: MockProvider, names: Names) -> Config:
    providers = [{"id": "one", "concurrency": 64, "models": {"m": {"input": 2, "output": 8}}}]
    key = {
        "id": f"team-{names.namespace}",
        "key_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
    }
    return load_config(write_config(tmp_path / "batches.yaml", mock, providers, keys=[key]))


@pytest.fixture
async def sdk(batch_config: Config, gateway_in_front: Any) -> AsyncIterator[AsyncOpenAI]:
    async with gateway_in_front(batch_config) as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0, timeout=60)
        yield client
        await client.close()


def line(custom_id: str, model: str = "m", **body: Any) -> bytes:
    request = {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}]}
    entry = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return orjson.dumps({**entry, "body": {**request, **body}})


async def finished(sdk: AsyncOpenAI, batch_id: str, timeout_s: float = 120) -> Any:
    seen: dict[str, Any] = {}

    async def ended() -> bool:
        seen["batch"] = await sdk.batches.retrieve(batch_id)
        return seen["batch"].status in ("completed", "failed", "expired", "cancelled")

    await eventually(ended, timeout_s, f"batch {batch_id} to end", interval_s=0.2)
    return seen["batch"]


async def lines_of(sdk: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await sdk.files.content(file_id)
    return [orjson.loads(row) for row in content.read().splitlines()]


async def test_the_sdk_runs_a_thousand_line_batch_and_reads_every_answer_once(
    sdk: AsyncOpenAI, mock: MockProvider, tmp_path: Path
) -> None:
    # Every 100th line asks for a model the config lacks: its answer is an error line (404).
    ids = [f"req-{i}" for i in range(1000)]
    path = tmp_path / "input.jsonl"
    path.write_bytes(
        b"\n".join(line(c, model="m" if i % 100 else "no-such-model") for i, c in enumerate(ids))
    )
    uploaded = await sdk.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size and uploaded.purpose == "batch"
    assert (await sdk.files.content(uploaded.id)).read() == path.read_bytes()

    batch = await sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "first"},
    )
    assert batch.status == "validating" and batch.metadata == {"run": "first"}
    done = await finished(sdk, batch.id)

    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (1000, 990)
    assert done.request_counts.failed == 10
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = await lines_of(sdk, done.output_file_id)
    errors = await lines_of(sdk, done.error_file_id)
    assert sorted(r["custom_id"] for r in output + errors) == sorted(ids)
    for row in output:
        assert row["response"]["status_code"] == 200 and row["error"] is None
        content = row["response"]["body"]["choices"][0]["message"]["content"]
        assert (content, "stop") == expected_completion(
            [{"role": "user", "content": f"say {row['custom_id']}"}]
        )
    assert {r["response"]["status_code"] for r in errors} == {404}
    assert {r["response"]["body"]["error"]["code"] for r in errors} == {"model_unavailable"}
    assert mock.stats()["calls"] == 990
    assert done.usage is not None and done.usage.input_tokens > 0 and done.usage.output_tokens > 0


async def test_a_batch_with_invalid_lines_fails_naming_each_line(
    sdk: AsyncOpenAI, mock: MockProvider, tmp_path: Path
) -> None:
    rows = [
        line("ok-1"),
        b"not json",
        line("ok-2", temperature=7),
        line("ok-1"),  # a custom_id again
        orjson.dumps(
            {"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}
        ),
        line("ok-3", stream=True),
        line("ok-4", not_a_field=1),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(rows))
    uploaded = await sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await finished(sdk, batch.id)

    assert done.status == "failed" and done.failed_at is not None
    assert done.errors is not None and done.errors.data is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "invalid_request"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "invalid_request"),
        (7, "invalid_request"),
    }
    assert mock.stats()["calls"] == 0  # nothing of a failed batch is sent


async def test_submit_stores_an_openai_batch_file_and_batches_commands_read_it(
    batch_config: Config,
    gateway_in_front: Any,
    names: Names,
    database_url: str,
    tmp_path: Path,
) -> None:
    ids = [f"cli-{i}" for i in range(20)]
    source = tmp_path / "openai.jsonl"
    source.write_bytes(b"\n".join(line(c) for c in ids) + b"\n")
    config_path = tmp_path / "batches.yaml"
    env = {**process_env(names, database_url, config_path), "SWITCHYARD_KEY": SECRET}
    async with gateway_in_front(batch_config):
        code, out = await run_cli(env, "submit", str(source), "--timeout", "60")
        assert code == 0, out
        results = tmp_path / "openai.results.jsonl"
        answered = [orjson.loads(r) for r in results.read_bytes().splitlines()]
        assert sorted(r["custom_id"] for r in answered) == sorted(ids)
        assert not (tmp_path / "openai.errors.jsonl").exists()
        batch_id = next(w for w in out.split() if w.startswith("batch_"))

        code, out = await run_cli(env, "batches", "list")
        assert code == 0 and batch_id in out and "completed" in out, out
        code, out = await run_cli(env, "batches", "show", batch_id)
        shown = orjson.loads(out)
        assert shown["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
        code, out = await run_cli(env, "batches", "download", batch_id, "--out", str(tmp_path))
        assert code == 0, out
        written = (tmp_path / f"{batch_id}_output.jsonl").read_bytes()
        assert written == results.read_bytes()

"""The gateway's async jobs API over real HTTP, in front of the real pipeline: a job answered at
once with its position, ETA and estimated cost, its result read back from Postgres, a queued
one cancelled (never called, its request given back), and the caller's list."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from broker.core.config import Config, load_config
from broker.core.names import Names
from mock_provider import expected_completion
from tests.conftest import MockProvider, eventually, write_config

SECRET = "sk-jobs-api-key"
OTHER = "sk-jobs-api-other-key"


def _key(key_id: str, secret: str) -> dict[str, Any]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}


@pytest.fixture
def jobs_config(tmp_path: Path, mock: MockProvider, names: Names) -> Config:
    providers = [{"id": "one", "concurrency": 1, "models": {"m": {"input": 2, "output": 8}}}]
    # Key ids of this test's own: the session's database holds every test's jobs.
    keys = [_key(f"team-{names.namespace}", SECRET), _key(f"other-{names.namespace}", OTHER)]
    return load_config(write_config(tmp_path / "jobs.yaml", mock, providers, keys=keys))


@pytest.fixture
async def http(jobs_config: Config, gateway_in_front: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        gateway_in_front(jobs_config) as url,
        httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {SECRET}"}, timeout=30
        ) as client,
    ):
        yield client


def ask(i: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"async question {i}"}]}


async def ended(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        found.update((await http.get(f"/v1/jobs/{job_id}")).json())
        return found["status"] not in ("queued", "running")

    await eventually(done, 30, f"job {job_id} to end", interval_s=0.1)
    return found


async def test_a_job_is_answered_at_once_then_its_result_is_kept(
    http: httpx.AsyncClient, pg: asyncpg.Connection, mock: MockProvider, names: Names
) -> None:
    created = await http.post("/v1/jobs", json=ask(0))
    assert created.status_code == 202
    job = created.json()
    assert job["object"] == "switchyard.job" and job["id"].startswith("job-")
    assert job["status"] in ("queued", "running", "succeeded")
    if job["status"] == "queued":
        assert job["position"] == 0 and job["provider"] == "one"
        assert float(job["estimated_cost_usd"]) > 0
    done = await ended(http, job["id"])
    assert done["status"] == "succeeded"
    result = done["result"]
    content = result["response"]["choices"][0]["message"]["content"]
    assert content == expected_completion(ask(0)["messages"])[0]
    row = await pg.fetchrow("SELECT owner, status FROM api_jobs WHERE job_id = $1", job["id"])
    assert row is not None and row["status"] == "succeeded"
    assert row["owner"] == f"team-{names.namespace}"

    async def recorded() -> bool:
        sql = "SELECT count(*) FROM usage WHERE job_id = $1"
        return bool(await pg.fetchval(sql, job["id"]) == 1)

    await eventually(recorded, 10, "its usage row")
    assert mock.stats()["calls"] == 1


async def test_queued_jobs_show_position_and_eta_and_a_cancelled_one_is_never_called(
    http: httpx.AsyncClient, mock: MockProvider
) -> None:
    mock.configure(latency_ms=600)  # a drain of some seconds: the rate has time to be measured
    jobs = [(await http.post("/v1/jobs", json=ask(i))).json() for i in range(8)]
    last, doomed = jobs[-1]["id"], jobs[3]["id"]
    seen = (await http.get(f"/v1/jobs/{last}")).json()
    assert seen["status"] == "queued" and seen["position"] >= 3

    cancelled = await http.delete(f"/v1/jobs/{doomed}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    other = httpx.Headers({"authorization": f"Bearer {OTHER}"})
    assert (await http.delete(f"/v1/jobs/{last}", headers=other)).status_code == 404
    assert (await http.get(f"/v1/jobs/{last}", headers=other)).status_code == 404

    positions, etas = [], []
    while True:
        now = (await http.get(f"/v1/jobs/{last}")).json()
        if now["status"] != "queued":
            break
        positions.append(now["position"])
        if now["eta_s"] is not None:
            etas.append((now["position"], now["eta_s"]))
        await asyncio.sleep(0.1)
    assert positions == sorted(positions, reverse=True) and len(set(positions)) >= 2
    far, near = max(etas), min(etas)  # farther back in the queue, a later start
    assert far[0] > near[0] and far[1] > near[1], etas

    results = {job["id"]: await ended(http, job["id"]) for job in jobs}
    assert results[doomed]["status"] == "cancelled"
    assert results[doomed]["result"]["error"]["code"] == "cancelled"
    assert [r["status"] for i, r in results.items() if i != doomed] == ["succeeded"] * 7
    assert mock.stats()["calls"] == 7
    late = await http.delete(f"/v1/jobs/{last}")
    assert late.status_code == 409 and late.json()["error"]["code"] == "job_ended"


async def test_the_list_is_the_callers_newest_first_in_pages(http: httpx.AsyncClient) -> None:
    ids = [(await http.post("/v1/jobs", json=ask(i))).json()["id"] for i in range(3)]
    for job_id in ids:
        await ended(http, job_id)
    page = (await http.get("/v1/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = (await http.get("/v1/jobs", params={"limit": 2, "after": ids[1]})).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    done = (await http.get("/v1/jobs", params={"status": "succeeded"})).json()
    assert {j["id"] for j in done["data"]} == set(ids)
    other = {"authorization": f"Bearer {OTHER}"}
    assert (await http.get("/v1/jobs", headers=other)).json()["data"] == []


async def test_a_body_python_reads_but_json_does_not_hold_is_refused(
    http: httpx.AsyncClient, mock: MockProvider
) -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": NaN}}'
    )
    refused = await http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert refused.status_code == 400
    assert "NaN" in refused.json()["error"]["message"]
    assert mock.stats()["calls"] == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    # No webhooks.secret is configured here: a webhook could not be signed.
    [({"webhook": "https://example.com/hook"}, "webhook"), ({"stream": True}, "stream")],
)
async def test_what_an_async_job_cannot_do_is_refused_by_name(
    http: httpx.AsyncClient, mock: MockProvider, extra: dict[str, Any], param: str
) -> None:
    refused = await http.post("/v1/jobs", json={**ask(0), **extra})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == param
    assert (await http.get("/v1/jobs")).json()["data"] == []
    assert mock.stats()["calls"] == 0


def test_an_async_jobs_own_fields_are_not_sent_to_the_provider() -> None:
    """``webhook`` and ``defer`` are Switchyard's: a provider would refuse them (or Anthropic's
    and Gemini's adapters would, by name)."""
    from broker.gateway.chat import job_from_request
    from broker.gateway.jobs import JobRequest

    body = JobRequest.model_validate(
        {**ask(0), "webhook": "https://hooks.example.com/x", "defer": True, "temperature": 0.1}
    )
    job = job_from_request(body, {}, {"m"})
    assert job.params.model_dump(exclude_none=True) == {"temperature": 0.1, "stream": False}
    assert not job.params.model_extra

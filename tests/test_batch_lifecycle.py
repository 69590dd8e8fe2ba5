"""A stored batch's life past the happy path, through the official ``openai`` SDK against a
gateway in front of the real pipeline: cancelled while its lines are queued (every custom_id
once, lines never sent or cancelled in the error file, the mock called once per answered line),
expired while its lines are queued, batches and files listed, read and deleted (another key
sees none of them), and the bounds of uploads and batch requests.

Also what the first writing of these tests found, fixed since: a batch cancelled while it is
validated counts its lines, the input file of a running batch cannot be deleted, a stopped runner
hands its batches on at once, an upload's ``expires_after`` is refused by name and a files
listing's ``order`` is acted on."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
from openai import AsyncOpenAI

from broker.core.config import Config, load_config
from broker.core.names import Names
from broker.gateway.batches.runner import IN_FLIGHT
from tests.conftest import AMQP_URL, REDIS_URL, MockProvider, eventually, free_port, write_config
from tests.test_batches import finished, line, lines_of

SECRET = "sk-lifecycle-key"
OTHER = "sk-lifecycle-other-key"

Clients = tuple[AsyncOpenAI, AsyncOpenAI]
"""The SDK as the batch's owner (``SECRET``), and as another key (``OTHER``)."""


def _key(key_id: str, secret: str) -> dict[str, Any]:
    return {"id": key_id, "key_sha256": hashlib.sha256(secret.encode()).hexdigest()}


def two_keys_config(tmp_path: Path, mock: MockProvider, names: Names, concurrency: int) -> Config:
    """Provider ``one`` (model ``m``) on the mock; two keys of this test's own (the session's
    database holds every test's batches and files)."""
    providers = [
        {"id": "one", "concurrency": concurrency, "models": {"m": {"input": 2, "output": 8}}}
    ]
    keys = [_key(f"team-{names.namespace}", SECRET), _key(f"other-{names.namespace}", OTHER)]
    return load_config(write_config(tmp_path / "lifecycle.yaml", mock, providers, keys=keys))


@pytest.fixture
def gateway(
    names: Names, database_url: str, pipeline: Any
) -> Callable[..., AbstractAsyncContextManager[Clients]]:
    """``async with gateway(config, in_flight=n) as (sdk, other)``: the pipeline and a gateway
    whose batch runner keeps at most ``n`` lines of a batch unanswered in flight."""

    @asynccontextmanager
    async def run(config: Config, *, in_flight: int = IN_FLIGHT) -> AsyncIterator[Clients]:
        from broker.gateway.service import Gateway

        port = free_port()
        service = Gateway(
            AMQP_URL,
            config,
            names,
            port=port,
            redis_url=REDIS_URL,
            database_url=database_url,
            batch_in_flight=in_flight,
        )
        url = f"http://127.0.0.1:{port}/v1"
        async with pipeline(config):
            await service.start()
            own = AsyncOpenAI(base_url=url, api_key=SECRET, max_retries=0, timeout=60)
            other = AsyncOpenAI(base_url=url, api_key=OTHER, max_retries=0, timeout=60)
            try:
                yield own, other
            finally:
                await own.close()
                await other.close()
                await service.stop(grace_s=5)

    return run


async def start_batch(sdk: AsyncOpenAI, path: Path, ids: list[str], **create: Any) -> Any:
    path.write_bytes(b"\n".join(line(c) for c in ids))  # noqa: ASYNC240 (a small file)
    uploaded = await sdk.files.create(file=path.open("rb"), purpose="batch")
    return await sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **create,
    )


async def answered(sdk: AsyncOpenAI, batch_id: str, at_least: int, timeout_s: float = 30) -> Any:
    """Wait until the running batch has ``at_least`` lines answered (completed)."""
    seen: dict[str, Any] = {}

    async def enough() -> bool:
        batch = seen["batch"] = await sdk.batches.retrieve(batch_id)
        assert batch.status in ("validating", "in_progress"), batch
        if batch.status == "validating":
            return False
        assert batch.request_counts is not None
        return batch.request_counts.completed >= at_least

    await eventually(enough, timeout_s, f"{at_least} lines of {batch_id} answered", 0.1)
    return seen["batch"]


async def taken_over(pg: asyncpg.Connection, batch_id: str, runner_id: str) -> None:
    """Wait until ``runner_id`` holds the batch; a plain failure (not a timeout) if it does
    not within 10 s."""

    async def held() -> bool:
        runner = await pg.fetchval("SELECT runner FROM batches WHERE batch_id = $1", batch_id)
        return bool(runner == runner_id)

    try:
        await eventually(held, 10, f"runner {runner_id} to take {batch_id}", 0.1)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def index(row: dict[str, Any]) -> int:
    """The input position of a line whose custom_id is ``<prefix>-<i>``."""
    return int(row["custom_id"].rsplit("-", 1)[1])


# ---------------------------------------------------------------------------------------------
# Cancel


async def test_a_batch_cancelled_while_its_lines_are_queued_answers_each_line_once(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    """400 lines, two calls at a time of 400 ms, at most 100 lines in flight: cancelled once a
    few are answered, the lines never sent end ``batch_cancelled``, those queued end with their
    job's own ``cancelled`` (409), those called run to their end (200); nothing more is called
    after the cancel than what was running."""
    mock.configure(latency_ms=400)
    config = two_keys_config(tmp_path, mock, names, concurrency=2)
    ids = [f"cx-{i}" for i in range(400)]
    async with gateway(config, in_flight=100) as (sdk, other):
        batch = await start_batch(sdk, tmp_path / "cancel.jsonl", ids)
        await answered(sdk, batch.id, at_least=2)

        with pytest.raises(openai.NotFoundError):  # another key's batch is none of its own
            await other.batches.cancel(batch.id)
        cancelling = await sdk.batches.cancel(batch.id)
        assert cancelling.status == "cancelling", cancelling
        assert cancelling.cancelling_at is not None and cancelling.cancelled_at is None
        again = await sdk.batches.cancel(batch.id)  # while it is being cancelled: the same
        assert (again.status, again.cancelling_at) == ("cancelling", cancelling.cancelling_at)

        done = await finished(sdk, batch.id, timeout_s=60)
        assert done.status == "cancelled", done
        assert done.cancelling_at == cancelling.cancelling_at
        assert done.cancelled_at is not None and done.cancelled_at >= done.cancelling_at
        assert done.completed_at is None and done.expired_at is None

        output = await lines_of(sdk, done.output_file_id)
        errors = await lines_of(sdk, done.error_file_id)
        custom_ids = [r["custom_id"] for r in output + errors]
        assert sorted(custom_ids) == sorted(ids) and len(custom_ids) == len(ids)

        assert output and all(r["response"]["status_code"] == 200 for r in output)
        assert all(r["error"] is None for r in output)
        not_sent = [r for r in errors if r["response"] is None]
        queued = [r for r in errors if r["response"] is not None]
        assert {r["error"]["code"] for r in not_sent} == {"batch_cancelled"}
        assert {r["response"]["status_code"] for r in queued} == {409}, queued[:3]
        assert {r["response"]["body"]["error"]["code"] for r in queued} == {"cancelled"}
        assert all(r["error"] is None for r in queued)
        # Both kinds happened: at most 100 were in flight, and two were being called.
        assert not_sent and queued, (len(output), len(not_sent), len(queued))
        # The lines never sent are the tail of the file: those past the last one sent.
        assert max(index(r) for r in output + queued) < min(index(r) for r in not_sent)

        assert done.request_counts is not None
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (400, len(output), len(errors))
        # Each call made answered a line 200; no line failed after its call (none should).
        failed_after_call = [r for r in queued if r["response"]["status_code"] != 409]
        assert failed_after_call == []
        assert mock.stats()["calls"] == len(output) + len(failed_after_call)

        # Cancelling again once it has ended: it stays as it ended (cancel is idempotent).
        after = await sdk.batches.cancel(batch.id)
        assert (after.status, after.cancelled_at) == ("cancelled", done.cancelled_at)
        assert mock.stats()["calls"] == len(output)  # and nothing was called since


async def test_a_completed_batch_cannot_be_cancelled(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    async with gateway(config) as (sdk, _):
        batch = await start_batch(sdk, tmp_path / "done.jsonl", ["d-0", "d-1", "d-2"])
        done = await finished(sdk, batch.id, timeout_s=60)
        assert done.status == "completed", done
        with pytest.raises(openai.ConflictError) as refused:
            await sdk.batches.cancel(batch.id)
        assert refused.value.code == "batch_ended" and "completed" in refused.value.message
        still = await sdk.batches.retrieve(batch.id)
        assert (still.status, still.cancelling_at, still.cancelled_at) == ("completed", None, None)


# ---------------------------------------------------------------------------------------------
# Expiry


async def test_a_batch_whose_window_ends_while_lines_are_queued_ends_expired(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names, pg: asyncpg.Connection
) -> None:
    """The window is made to end a second ahead (the row's ``expires_at``) while lines wait:
    the batch ends ``expired``, what was answered in its output file, the rest ``batch_expired``
    in its error file. The jobs already sent carry the old window as their deadline, so some may
    still be answered after: only what must hold is asserted."""
    mock.configure(latency_ms=300)
    config = two_keys_config(tmp_path, mock, names, concurrency=2)
    ids = [f"ex-{i}" for i in range(200)]
    async with gateway(config, in_flight=40) as (sdk, _):
        batch = await start_batch(sdk, tmp_path / "expire.jsonl", ids)
        await answered(sdk, batch.id, at_least=2)
        moved = await pg.fetchval(
            "UPDATE batches SET expires_at = now() + interval '1 second'"
            " WHERE batch_id = $1 AND status = 'in_progress' RETURNING expires_at",
            batch.id,
        )
        assert moved is not None, "the batch left in_progress before its window was moved"

        done = await finished(sdk, batch.id, timeout_s=30)
        assert done.status == "expired", done
        assert done.expires_at == int(moved.timestamp())
        assert done.expired_at is not None and done.expired_at >= done.expires_at
        assert done.completed_at is None and done.cancelled_at is None

        output = await lines_of(sdk, done.output_file_id)
        errors = await lines_of(sdk, done.error_file_id)
        custom_ids = [r["custom_id"] for r in output + errors]
        assert sorted(custom_ids) == sorted(ids) and len(custom_ids) == len(ids)
        assert len(output) >= 2
        assert {r["response"]["status_code"] for r in output} == {200}
        assert errors, "no line was left when the window ended"
        assert {r["error"]["code"] for r in errors} == {"batch_expired"}
        assert all(r["response"] is None for r in errors)
        assert done.request_counts is not None
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (200, len(output), len(errors))
        # A line answered after the end is not recorded: the files stay as the batch ended.
        output_again = await lines_of(sdk, done.output_file_id)
        assert len(output_again) == len(output)


# ---------------------------------------------------------------------------------------------
# Listing, reading and deleting


async def test_batches_and_files_are_listed_read_and_deleted_by_their_own_key(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    async with gateway(config) as (sdk, other):
        made = []
        for n in range(3):
            batch = await start_batch(
                sdk, tmp_path / f"list-{n}.jsonl", [f"l{n}-{i}" for i in range(n + 1)]
            )
            made.append(batch)
        theirs = await start_batch(other, tmp_path / "theirs.jsonl", ["t-0"])
        ended = [await finished(sdk, b.id, timeout_s=60) for b in made]
        assert [b.status for b in ended] == ["completed"] * 3
        assert (await finished(other, theirs.id, timeout_s=60)).status == "completed"

        # Newest first, a page at a time: limit=1, then after = the last id.
        newest_first = [b.id for b in reversed(made)]
        pages: list[list[str]] = []
        page = await sdk.batches.list(limit=1)
        while True:
            pages.append([b.id for b in page.data])
            if not page.has_more:
                break
            page = await sdk.batches.list(limit=1, after=page.data[-1].id)
        assert pages == [[i] for i in newest_first]
        walked = [b.id async for b in sdk.batches.list(limit=2)]  # the SDK's own paging
        assert walked == newest_first
        listed = await sdk.batches.list(limit=2)
        assert [b.id for b in listed.data] == newest_first[:2] and listed.has_more
        assert (await sdk.batches.list(limit=20)).has_more is False
        assert [b.id async for b in other.batches.list()] == [theirs.id]

        # Another key's batch is none of this key's: 404, whether read or cancelled.
        for batch_id in (theirs.id, "batch_nosuchbatch"):
            with pytest.raises(openai.NotFoundError):
                await sdk.batches.retrieve(batch_id)
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(made[0].id)

        # Files: three inputs and three output files (no errors), newest first.
        files = [f async for f in sdk.files.list()]
        inputs = [b.input_file_id for b in reversed(ended)]
        outputs = [b.output_file_id for b in reversed(ended)]
        assert {f.id for f in files} == {*inputs, *outputs}
        assert [f.created_at for f in files] == sorted((f.created_at for f in files), reverse=True)
        assert [f.id async for f in sdk.files.list(purpose="batch")] == inputs
        assert {f.id async for f in sdk.files.list(purpose="batch_output")} == set(outputs)
        first = await sdk.files.list(limit=1)
        assert len(first.data) == 1 and first.has_more
        paged = [f.id async for f in sdk.files.list(limit=1)]
        assert paged == [f.id for f in files]
        assert [f.id async for f in other.files.list(purpose="batch")] == [theirs.input_file_id]

        source = await sdk.files.retrieve(ended[2].input_file_id)
        assert (source.purpose, source.filename) == ("batch", "list-2.jsonl")
        assert source.bytes == (tmp_path / "list-2.jsonl").stat().st_size
        result = await sdk.files.retrieve(ended[2].output_file_id)
        assert result.purpose == "batch_output" and result.filename.endswith("_output.jsonl")
        content = (await sdk.files.content(result.id)).read()
        assert result.bytes == len(content) and len(content.splitlines()) == 3
        with pytest.raises(openai.NotFoundError):
            await other.files.retrieve(source.id)
        with pytest.raises(openai.NotFoundError):
            await other.files.content(source.id)
        with pytest.raises(openai.NotFoundError):
            await other.files.delete(source.id)

        deleted = await sdk.files.delete(source.id)
        assert (deleted.id, deleted.deleted) == (source.id, True)
        with pytest.raises(openai.NotFoundError):
            await sdk.files.retrieve(source.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.files.content(source.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.files.delete(source.id)
        assert source.id not in {f.id async for f in sdk.files.list()}
        # The batch it fed is still there, and its output still reads.
        kept = await sdk.batches.retrieve(ended[2].id)
        assert kept.status == "completed" and kept.input_file_id == source.id
        assert len(await lines_of(sdk, kept.output_file_id)) == 3
        await sdk.files.delete(result.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.files.content(result.id)


# ---------------------------------------------------------------------------------------------
# Upload and create bounds


async def test_uploads_and_batches_out_of_bounds_are_refused_naming_the_field(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    path = tmp_path / "bounds.jsonl"
    path.write_bytes(line("b-0"))
    async with gateway(config) as (sdk, other):
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.files.create(file=path.open("rb"), purpose="assistants")
        assert refused.value.param == "purpose" and "purpose" in refused.value.message
        assert [f async for f in sdk.files.list()] == []  # nothing kept of it

        uploaded = await sdk.files.create(file=path.open("rb"), purpose="batch")
        good = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"}
        refusals: list[tuple[dict[str, Any], str]] = [
            ({**good, "completion_window": "200h"}, "completion_window"),
            ({**good, "completion_window": "169h"}, "completion_window"),
            ({**good, "completion_window": "0h"}, "completion_window"),
            ({**good, "completion_window": "24h", "endpoint": "/v1/embeddings"}, "endpoint"),
            ({**good, "completion_window": "24h", "endpoint": "/v1/responses"}, "endpoint"),
            (
                {**good, "completion_window": "24h", "output_expires_after": {"seconds": 3600}},
                "output_expires_after",
            ),
        ]
        for body, field in refusals:
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.batches.create(**body)
            error = refused.value
            assert field in (error.param or "") or field in error.message, (body, error.body)
        # The longest window served is a week.
        week = await sdk.batches.create(**good, completion_window="168h")
        assert week.expires_at - week.created_at == int(timedelta(hours=168).total_seconds())

        # Another key's file is none of this key's: 404 naming input_file_id.
        with pytest.raises(openai.NotFoundError) as missing:
            await other.batches.create(**good, completion_window="24h")
        assert missing.value.param == "input_file_id"
        with pytest.raises(openai.NotFoundError):
            await sdk.batches.create(
                input_file_id="file-nosuchfile",
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        assert [b async for b in other.batches.list()] == []
        assert (await finished(sdk, week.id, timeout_s=30)).status == "completed"
        assert mock.stats()["calls"] == 1  # the week's single line; nothing refused was sent


async def test_an_upload_field_the_gateway_does_not_act_on_is_refused(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    """OpenAI's ``expires_after`` on an upload sets when the file is dropped. The gateway keeps
    its own retention: it must act on the field or refuse it, never take it and ignore it."""
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    path = tmp_path / "expiring.jsonl"
    path.write_bytes(line("e-0"))
    async with gateway(config) as (sdk, _):
        try:
            uploaded = await sdk.files.create(
                file=path.open("rb"),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": 3600},
            )
        except openai.BadRequestError as refused:
            assert "expires_after" in refused.message
            return
        assert uploaded.expires_at == uploaded.created_at + 3600, (
            f"expires_after was accepted and ignored: the file expires "
            f"{(uploaded.expires_at or 0) - uploaded.created_at} s after its upload"
        )


async def test_a_files_listing_order_is_acted_on_or_refused(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names
) -> None:
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    async with gateway(config) as (sdk, _):
        made = []
        for n in range(3):
            path = tmp_path / f"order-{n}.jsonl"
            path.write_bytes(line(f"o-{n}"))
            made.append((await sdk.files.create(file=path.open("rb"), purpose="batch")).id)
        try:
            listed = await sdk.files.list(order="asc")
        except openai.BadRequestError as refused:
            assert "order" in refused.message
            return
        assert [f.id for f in listed.data] == made, "order=asc was accepted and ignored"


async def test_a_batch_cancelled_while_it_is_validated_counts_the_lines_it_answers(
    gateway: Any, mock: MockProvider, tmp_path: Path, names: Names, pg: asyncpg.Connection
) -> None:
    """Cancelled once validation has written its first lines (it takes seconds for 20,000):
    every line is answered ``batch_cancelled``, none is called, and the counts add up."""
    config = two_keys_config(tmp_path, mock, names, concurrency=8)
    ids = [f"v-{i}" for i in range(20_000)]
    async with gateway(config) as (sdk, _):
        batch = await start_batch(sdk, tmp_path / "validate.jsonl", ids)

        async def validating() -> bool:
            row = await pg.fetchrow(
                "SELECT status, (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.batch_id)"
                " AS lines FROM batches b WHERE batch_id = $1",
                batch.id,
            )
            assert row is not None and row["status"] == "validating", row
            return bool(row["lines"])

        await eventually(validating, 30, "validation to write its first lines", 0.01)
        cancelling = await sdk.batches.cancel(batch.id)
        assert cancelling.status == "cancelling", cancelling
        done = await finished(sdk, batch.id, timeout_s=60)
        assert done.status == "cancelled", done
        output = await lines_of(sdk, done.output_file_id)
        errors = await lines_of(sdk, done.error_file_id)
        assert output == [] and mock.stats()["calls"] == 0
        assert sorted(r["custom_id"] for r in errors) == sorted(ids)
        assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
        assert done.request_counts is not None
        counts = done.request_counts
        assert (counts.completed, counts.failed) == (0, len(ids))
        assert counts.total == len(ids), counts


async def test_a_running_batch_whose_input_file_is_deleted_still_ends(
    names: Names,
    database_url: str,
    pipeline: Any,
    mock: MockProvider,
    tmp_path: Path,
    pg: asyncpg.Connection,
) -> None:
    """The input file deleted while lines wait to be sent, then the batch's runner replaced (a
    gateway restarted): the batch must still end, every custom_id once in its files (or the
    delete must be refused while the batch runs)."""
    from broker.gateway.service import Gateway

    mock.configure(latency_ms=200)
    config = two_keys_config(tmp_path, mock, names, concurrency=2)
    ids = [f"del-{i}" for i in range(60)]
    port = free_port()

    def new_gateway() -> Gateway:
        return Gateway(
            AMQP_URL,
            config,
            names,
            port=port,
            redis_url=REDIS_URL,
            database_url=database_url,
            batch_in_flight=10,
            batch_lease=timedelta(seconds=3),  # taken over soon (a stop does not release it)
        )

    async with pipeline(config):
        first = new_gateway()
        await first.start()
        sdk = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET, max_retries=0)
        try:
            batch = await start_batch(sdk, tmp_path / "deleted.jsonl", ids)
            await answered(sdk, batch.id, at_least=2)
            with contextlib.suppress(openai.ConflictError):  # refused while it runs: as good
                await sdk.files.delete(batch.input_file_id)
            await first.stop(grace_s=5)
            first = new_gateway()
            await first.start()  # its runner takes the batch over
            await taken_over(pg, batch.id, first.batch_runner.runner_id)
            try:
                done = await finished(sdk, batch.id, timeout_s=12)
            finally:
                # Never left running: a later test's runner would take it up.
                if (await sdk.batches.retrieve(batch.id)).status == "in_progress":
                    await sdk.batches.cancel(batch.id)
                    await finished(sdk, batch.id, timeout_s=30)
            output = await lines_of(sdk, done.output_file_id)
            errors = await lines_of(sdk, done.error_file_id)
            custom_ids = [r["custom_id"] for r in output + errors]
            assert sorted(custom_ids) == sorted(ids) and len(custom_ids) == len(ids)
        finally:
            await sdk.close()
            await first.stop(grace_s=5)


async def test_a_gateway_that_stops_hands_its_batches_on_at_once(
    names: Names,
    database_url: str,
    pipeline: Any,
    mock: MockProvider,
    tmp_path: Path,
    pg: asyncpg.Connection,
) -> None:
    from broker.gateway.service import Gateway

    mock.configure(latency_ms=200)
    config = two_keys_config(tmp_path, mock, names, concurrency=2)
    port = free_port()

    def new_gateway() -> Gateway:
        return Gateway(
            AMQP_URL, config, names, port=port, redis_url=REDIS_URL, database_url=database_url
        )

    async with pipeline(config):
        gateway = new_gateway()
        await gateway.start()
        sdk = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET, max_retries=0)
        try:
            batch = await start_batch(sdk, tmp_path / "handed.jsonl", [f"h-{i}" for i in range(40)])
            await answered(sdk, batch.id, at_least=2)
            runner = gateway.batch_runner.runner_id
            query = "SELECT status, runner, lease_until FROM batches WHERE batch_id = $1"
            held = await pg.fetchrow(query, batch.id)
            assert held is not None and held["runner"] == runner
            await gateway.stop(grace_s=5)
            held = await pg.fetchrow(query, batch.id)
            assert held is not None and held["status"] == "in_progress"
            lease_kept = (held["runner"], held["lease_until"])
            # Handed on by hand, so the batch ends now either way (a later test's runner would
            # take it up otherwise).
            await pg.execute(
                "UPDATE batches SET runner = NULL, lease_until = NULL WHERE batch_id = $1",
                batch.id,
            )
            gateway = new_gateway()
            await gateway.start()
            assert (await finished(sdk, batch.id, timeout_s=30)).status == "completed"
            # A runner that stops cleanly lets its batches go: the next need not wait out the
            # lease (30 s) of one that is gone.
            assert lease_kept == (None, None), f"the stopped runner kept its lease: {lease_kept}"
        finally:
            await sdk.close()
            await gateway.stop(grace_s=5)

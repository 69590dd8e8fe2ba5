"""One batch's life in a runner: validate its input, send its lines as jobs (a window of them
in flight), wait for their answers, then write its output and error files; or expire it, or
cancel it. Every step starts from the batch's rows, so a runner that takes over a batch whose
runner died goes on where that one stopped (a line sent twice is answered once: its job's
idempotency key)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.core.clock import utcnow
from broker.core.codec import encode
from broker.core.config import Config
from broker.core.names import HEADER_KEY, HEADER_TRACEPARENT, Names
from broker.core.priority import queue_priority
from broker.core.tracing import new_traceparent
from broker.core.webhook_urls import WebhookRefused, check_webhook
from broker.gateway.batches.files import FilesStore, split_lines
from broker.gateway.batches.lines import LineError, job_for_line, parse_line
from broker.gateway.batches.store import ENDED, BatchStore
from broker.state.job_states import JobStates
from broker.transport.amqp import Publisher

__all__ = ["BatchWork"]

log = logging.getLogger(__name__)

MAX_LINES = 50_000
"""OpenAI's limit per batch."""
MAX_ERRORS_SHOWN = 1_000
SEND_GROUP = 256
"""Lines published together, then recorded as sent (at most half the window)."""
POLL_S = 0.5
CANCEL_PATIENCE_S = 600.0
"""A cancelled batch waits this long without an answer for lines whose calls had started."""


class BatchWork:
    def __init__(
        self,
        store: BatchStore,
        files: FilesStore,
        publisher: Publisher,
        names: Names,
        config: Callable[[], Config],
        job_states: JobStates,
        *,
        results_queue: str,
        in_flight: int,
        on_end: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.store = store
        self.files = files
        self.publisher = publisher
        self.names = names
        self.config = config
        self.job_states = job_states
        self.results_queue = results_queue
        self.in_flight = in_flight
        self.group = max(1, min(SEND_GROUP, in_flight // 2))
        self.on_end = on_end

    async def run(self, batch_id: str) -> None:
        """Drive the batch until it ends (or this runner lost it)."""
        while (row := await self.store.get(batch_id, "*")) is not None:
            status = row["status"]
            if status in ENDED:
                return
            if row["expires_at"] <= utcnow():
                await self._end(row, "expired", "batch_expired", "the batch's window ended first")
            elif status == "validating":
                await self._validate(row)
            elif status == "in_progress":
                if await self._send(row):
                    await self._await_answers(row)
            elif status == "finalizing":
                await self._end(row, "completed")
            elif status == "cancelling":
                await self._cancel(row)

    async def _validate(self, row: dict[str, Any]) -> None:
        batch_id = row["batch_id"]
        await self.store.restart_lines(batch_id)
        errors: list[LineError] = []
        valid: list[tuple[int, str]] = []
        hooks: dict[str, str | None] = {}  # each webhook URL checked once: why refused
        count = lines = 0
        async for number, text in split_lines(self.files.chunks(row["input_file_id"])):
            lines += 1
            if lines > MAX_LINES:
                errors.append(LineError("too_many_lines", f"over {MAX_LINES} lines", number))
                break
            try:
                custom_id, request = parse_line(number, text, row["endpoint"])
                job_for_line(request, batch_id, number, row["expires_at"], set(), utcnow())
                if request.webhook is not None:
                    await self._check_hook(str(request.webhook), hooks, number)
            except LineError as exc:
                errors.append(exc)
                continue
            valid.append((number, custom_id))
            if len(valid) >= 1000:
                count += len(valid)
                errors += await self._add(batch_id, valid)
                valid = []
        count += len(valid)
        errors += await self._add(batch_id, valid)
        if lines == 0:
            errors.append(LineError("empty_file", "the input file has no lines", 0))
        if errors:
            shown = sorted(errors, key=lambda e: e.line)[:MAX_ERRORS_SHOWN]
            ending = {
                "status": "failed",
                "errors": {"object": "list", "data": [e.as_dict() for e in shown]},
                "failed_at": utcnow(),
                "key_secret": None,
            }
            now = await self.store.get(batch_id, "*")
            if now is not None and now["status"] == "validating":  # not cancelled meanwhile
                await self.on_end({**row, **ending})
                await self.store.update(batch_id, only_if="validating", **ending)
            return
        await self.store.analyze()
        await self.store.update(batch_id, only_if="validating", status="in_progress", total=count)

    async def _check_hook(self, url: str, hooks: dict[str, str | None], number: int) -> None:
        if url not in hooks:
            try:
                await check_webhook(url, self.config().webhooks, field="body.webhook")
                hooks[url] = None
            except WebhookRefused as exc:
                hooks[url] = exc.message
        if hooks[url] is not None:
            raise LineError("invalid_request", str(hooks[url]), number, "body.webhook")

    async def _add(self, batch_id: str, valid: list[tuple[int, str]]) -> list[LineError]:
        taken = await self.store.add_lines(batch_id, valid)
        return [
            LineError("duplicate_custom_id", "custom_id: used by an earlier line", n, "custom_id")
            for n in sorted(taken)
        ]

    async def _send(self, row: dict[str, Any]) -> bool:
        """Publish the lines not sent yet, keeping at most ``in_flight`` unanswered; False if
        the batch left ``in_progress`` meanwhile."""
        batch_id, sent = row["batch_id"], row["enqueued"]
        models = set(self.config().public_models())
        send_round = await self.store.next_round(batch_id)
        answered = await self.store.answered_after(batch_id, sent)  # not sent again
        group: list[Awaitable[None]] = []
        last = sent
        async for number, text in split_lines(self.files.chunks(row["input_file_id"])):
            if number <= sent or number in answered:
                continue
            _, request = parse_line(number, text, row["endpoint"])
            job = job_for_line(
                request, batch_id, number, row["expires_at"], models, utcnow(), send_round
            )
            group.append(
                self.publisher.publish(
                    self.names.jobs,
                    encode(job),
                    message_id=job.job_id,
                    correlation_id=job.job_id,
                    reply_to=self.results_queue,
                    priority=queue_priority(job),
                    headers=_line_headers(row["key_secret"]),
                )
            )
            last = number
            if len(group) >= self.group:
                if not await self._sent(batch_id, group, last):
                    return False
                group = []
        return await self._sent(batch_id, group, last)

    async def _sent(self, batch_id: str, group: list[Awaitable[None]], last: int) -> bool:
        """Wait for the group's confirms, record it sent, then wait for room in the window."""
        await asyncio.gather(*group)
        await self.store.update(batch_id, enqueued=last)
        while await self.store.pending(batch_id, last) > self.in_flight - self.group:
            row = await self.store.get(batch_id, "*")
            if row is None or row["status"] != "in_progress" or row["expires_at"] <= utcnow():
                return False
            await asyncio.sleep(POLL_S)
        row = await self.store.get(batch_id, "*")
        return row is not None and row["status"] == "in_progress"

    async def _await_answers(self, row: dict[str, Any]) -> None:
        """Every line sent: wait for the last answers, then finalize."""
        batch_id = row["batch_id"]
        while await self.store.pending(batch_id):
            await asyncio.sleep(POLL_S)
            now = await self.store.get(batch_id, "*")
            if now is None or now["status"] != "in_progress" or now["expires_at"] <= utcnow():
                return
        await self.store.update(batch_id, only_if="in_progress", status="finalizing")

    async def _cancel(self, row: dict[str, Any]) -> None:
        """Lines not sent are answered cancelled at once; those queued are cancelled (their
        jobs answer ``cancelled``); those already called run to their end."""
        batch_id, sent = row["batch_id"], row["enqueued"]
        # The group past ``enqueued`` may have been published by a runner that died before
        # recording it: cancelled as well, then the lines never sent are answered at once.
        for line in await self.store.unanswered(batch_id, sent + self.group):
            for send_round in range(1, row["send_round"] + 1):
                await self.job_states.cancel(f"{batch_id}-{line}-{send_round}", row["owner"])
        await self.store.close_unanswered(
            batch_id, "batch_cancelled", "the batch was cancelled before this line ran", sent
        )
        waited, pending = 0.0, await self.store.pending(batch_id)
        while pending and waited < CANCEL_PATIENCE_S and row["expires_at"] > utcnow():
            await asyncio.sleep(POLL_S)
            now_pending = await self.store.pending(batch_id)
            waited = 0.0 if now_pending < pending else waited + POLL_S
            pending = now_pending
        await self._end(row, "cancelled", "batch_cancelled", "the batch was cancelled")

    async def _end(
        self, row: dict[str, Any], status: str, code: str | None = None, message: str = ""
    ) -> None:
        """Answer what is left with ``code``, write the output and error files, and end."""
        batch_id = row["batch_id"]
        if code is not None:
            await self.store.close_unanswered(batch_id, code, message)
        output = await self.files.add_batch_file(batch_id, row["owner"], in_error=False)
        error = await self.files.add_batch_file(batch_id, row["owner"], in_error=True)
        ending = {
            "status": status,
            f"{status}_at": utcnow(),
            "output_file_id": output,
            "error_file_id": error,
            "key_secret": None,
            **await self.store.totals(batch_id),
        }
        # Told before it is recorded: a runner that dies between the two tells it again, under
        # the same webhook id (sent once).
        await self.on_end({**row, **ending})
        if await self.store.update(batch_id, only_if=row["status"], **ending):
            log.info("batch %s %s", batch_id, status)


def _line_headers(secret: str | None) -> dict[str, str]:
    """A line's job starts a trace of its own (and carries the batch's key, if any)."""
    headers = {HEADER_TRACEPARENT: new_traceparent()}
    if secret:
        headers[HEADER_KEY] = secret
    return headers

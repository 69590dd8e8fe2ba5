"""Questions about jobs over AMQP (``<ns>.control``): where a tracked job stands, or cancel it
before its call (``broker.state.job_states``), answered on the asker's reply queue. A caller
sees and cancels only its own jobs (its virtual key, as for the jobs it sends)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from broker.core.auth import authenticate
from broker.core.config import Config
from broker.core.errors import SwitchyardError, Unavailable
from broker.core.names import TYPE_STANDING, Names
from broker.state.job_states import JobStates
from broker.state.quota import REDIS_FAILURES
from broker.transport.amqp import Publisher
from schemas import JobQuery, JobStandingReply

__all__ = ["JobControl"]

log = logging.getLogger(__name__)


class JobControl:
    def __init__(
        self,
        jobs: JobStates | None,
        names: Names,
        publisher: Callable[[], Publisher],
        config: Callable[[], Config],
    ) -> None:
        self.jobs = jobs
        self.names = names
        self.publisher = publisher
        self.config = config

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            query = JobQuery.model_validate_json(message.body)
        except ValidationError as exc:
            await self.publisher().dead_letter(
                self.names,
                message,
                source_queue=self.names.control,
                code="invalid_message",
                reason=f"not a JobQuery: {exc.errors()[0]['msg']}",
            )
            return
        try:
            reply = await self._answer(query, message)
        except SwitchyardError as exc:
            reply = JobStandingReply(
                job_id=query.job_id, state="not_found", error=exc.to_job_error()
            )
        if message.reply_to:
            await self.publisher().reply(
                message.reply_to,
                reply.model_dump_json(exclude_none=True).encode(),
                correlation_id=message.correlation_id,
                message_type=TYPE_STANDING,
                persistent=False,
            )

    async def _answer(self, query: JobQuery, message: AbstractIncomingMessage) -> JobStandingReply:
        key = authenticate(message.headers, self.config())
        caller = key.id if key is not None else None
        if self.jobs is None:
            raise Unavailable("this scheduler has no Redis: jobs are not tracked")
        try:
            if query.op == "cancel":
                outcome = await self.jobs.cancel(query.job_id, caller)
                if outcome == "cancelled":
                    log.info("job %s cancelled by its caller", query.job_id)
                    return JobStandingReply(job_id=query.job_id, state="cancelled")
            standing = await self.jobs.standing(query.job_id)
        except REDIS_FAILURES as exc:
            raise Unavailable(
                f"Redis is unreachable ({type(exc).__name__}): where jobs stand is not known now"
            ) from exc
        if caller is not None and standing.owner not in (None, caller):
            return JobStandingReply(job_id=query.job_id, state="not_found")
        return JobStandingReply(
            job_id=standing.job_id,
            state=standing.state,
            provider=standing.provider,
            model=standing.model,
            priority=standing.priority,
            position=standing.position,
            eta_s=standing.eta_s,
            est_cost_usd=standing.est_cost_usd,
        )

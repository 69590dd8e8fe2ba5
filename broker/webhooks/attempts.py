"""One attempt at a delivery, from the checks before it to the delivery's next state.

2xx: delivered. 410: its endpoint is disabled and the delivery is dead. Anything else (another
status, no answer in ``timeout_s``, a failed connection, a name that does not resolve): tried
again after the schedule's next wait, varied by the jitter; after the last, dead. Dead means
``state = dead`` and a copy in ``<ns>.dead`` with every attempt's status, latency and error. A
delivery whose endpoint is disabled, whose URL the SSRF guard now refuses (DNS can change) or
that no secret can sign ends dead at once, without a POST.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import orjson
from sqlalchemy.exc import DBAPIError

from broker.core import names as n
from broker.core.clock import utcnow
from broker.core.errors import InvalidMessage
from broker.core.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_DELIVERIES
from broker.core.names import HEADER_TRACEPARENT, Names
from broker.core.tracing import current, hop
from broker.core.webhook_store import Attempt, Due, Next, WebhookStore
from broker.core.webhook_urls import UnresolvableHost, check_webhook_url
from broker.core.webhooks import WebhooksConfig, signed_headers
from broker.transport.amqp import BROKER_FAILURES, Publisher
from broker.webhooks.sender import Answer, Sender

__all__ = ["Attempts"]

log = logging.getLogger(__name__)

SETTLE_PAUSES_S = (1.0, 2.0, 4.0)
"""Postgres away as an attempt ends: its outcome is written again after these pauses; then it
is given up, the lease lapses, and the delivery is attempted again (at least once)."""
_DEAD_LETTER_FAILURES: tuple[type[BaseException], ...] = (*BROKER_FAILURES, DBAPIError, OSError)
CODE_FAILED = "webhook_failed"  # every attempt of the schedule failed
CODE_GONE = "webhook_gone"  # the receiver answered 410, now or before
CODE_REFUSED = "webhook_refused"  # the SSRF guard, or no secret to sign with


class Attempts:
    """Makes attempts and records them; ``on_retry`` hears when a retry falls due."""

    def __init__(
        self,
        store: WebhookStore,
        sender: Sender,
        publisher: Publisher,
        names: Names,
        config: Callable[[], WebhooksConfig],
        on_retry: Callable[[datetime], None],
    ) -> None:
        self._store = store
        self._sender = sender
        self._publisher = publisher
        self._names = names
        self._config = config
        self._on_retry = on_retry

    async def run(self, due: Due) -> None:
        """Attempt ``due`` (unless it must end without one) and record what came of it, as a hop
        of its job's trace (its log lines carry the trace id; a span with OpenTelemetry on)."""
        with hop("webhook", due.traceparent):
            await self._run(due)

    async def _run(self, due: Due) -> None:
        config = self._config()
        secrets = config.secrets_for(due.url)
        if due.disabled is not None:
            return await self._end(due, None, CODE_GONE, f"endpoint disabled: {due.disabled}")
        if not secrets:
            return await self._end(due, None, CODE_REFUSED, "no webhooks.secret to sign it with")
        attempted_at = utcnow()
        try:
            await check_webhook_url(due.url, config.allow)
        except UnresolvableHost as exc:
            answer = Answer(0.0, error=exc.message)
        except InvalidMessage as exc:
            return await self._end(due, None, CODE_REFUSED, exc.message)
        else:
            headers = signed_headers(secrets, due.webhook_id, int(time.time()), due.body)
            headers["content-type"] = "application/json"
            if (trace := current()) is not None:  # this attempt's span, with OpenTelemetry
                headers[HEADER_TRACEPARENT] = trace
            answer = await self._sender.post(due.url, headers, due.body)
        attempt = Attempt(attempted_at, answer.latency_ms, answer.status_code, answer.error)
        status = answer.status_code
        WEBHOOK_ATTEMPTS.labels(f"{status // 100}xx" if status is not None else "error").inc()
        await self._outcome(due, attempt, answer, config)

    async def _outcome(
        self, due: Due, attempt: Attempt, answer: Answer, config: WebhooksConfig
    ) -> None:
        status = answer.status_code
        if answer.refused is not None:
            await self._end(due, attempt, CODE_REFUSED, answer.refused)
        elif status is not None and 200 <= status < 300:
            if await self._settle(due, attempt, Next("delivered")):
                WEBHOOK_DELIVERIES.labels("delivered").inc()
                log.debug("webhook %s delivered (%s)", due.webhook_id, status)
        elif status == 410:
            reason = "the receiver answered 410 Gone: its endpoint is disabled until a replay"
            try:
                await self._store.disable_endpoint(due.url, reason)
            except (DBAPIError, OSError):
                log.warning("webhook %s: its endpoint could not be disabled now", due.webhook_id)
            await self._end(due, attempt, CODE_GONE, reason)
        else:
            tries = due.tries + 1
            wait_s = config.retry_wait_s(tries, random.uniform(-1.0, 1.0))
            last = f"status {status}" if status is not None else attempt.error
            if wait_s is None:
                await self._end(due, attempt, CODE_FAILED, f"{tries} attempts failed; last: {last}")
                return
            at = utcnow() + timedelta(seconds=wait_s)
            if await self._settle(due, attempt, Next("pending", at=at)):
                log.info(
                    "webhook %s: attempt failed (%s); next in %.1f s", due.webhook_id, last, wait_s
                )
                self._on_retry(at)

    async def _end(self, due: Due, attempt: Attempt | None, code: str, reason: str) -> None:
        """Dead: recorded, then dead-lettered with every attempt (if the lease still held)."""
        if not await self._settle(due, attempt, Next("dead", error=reason)):
            return
        WEBHOOK_DELIVERIES.labels("dead").inc()
        log.warning("webhook %s is dead (%s)", due.webhook_id, code)
        try:
            history = await self._store.attempts(due.webhook_id)
            body = orjson.dumps(
                {
                    "webhook_id": due.webhook_id,
                    "url": due.url,
                    "type": due.type,
                    "owner": due.owner,
                    "reason": reason,
                    "payload": orjson.Fragment(due.body),
                    "attempts": history,
                }
            )
            await self._publisher.publish(
                self._names.dead,
                body,
                message_id=due.webhook_id,
                headers={
                    n.HEADER_DEAD_REASON: reason[:1000],
                    n.HEADER_DEAD_CODE: code,
                    n.HEADER_DEAD_QUEUE: self._names.webhooks,
                },
            )
        except _DEAD_LETTER_FAILURES:
            log.error(
                "webhook %s is dead but its dead letter was not sent; it is listed by "
                "`switchyard webhooks list --state dead`",
                due.webhook_id,
            )

    async def _settle(self, due: Due, attempt: Attempt | None, then: Next) -> bool:
        """Write the outcome, waiting out a short Postgres outage; False if the lease was lost
        (or the outcome could not be written)."""
        for pause_s in (*SETTLE_PAUSES_S, None):
            try:
                return await self._store.settle(due, attempt, then)
            except (DBAPIError, OSError):
                if pause_s is None:
                    log.error(
                        "webhook %s: outcome not recorded (Postgres away); it is attempted "
                        "again once its lease lapses",
                        due.webhook_id,
                    )
                    return False
                log.warning("webhook %s: Postgres away; recording again", due.webhook_id)
                await asyncio.sleep(pause_s)
        return False

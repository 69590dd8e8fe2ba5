"""W3C trace context (``traceparent``) across every hop of a job, in its log lines and result.

The first entry makes it or continues the caller's (the client library, the gateway:
``continued``); it travels in the AMQP header ``traceparent`` on every hop (``passthrough_headers``)
and on webhooks. Each process handles a message inside ``hop``, which makes it the current trace
(a context variable): every log line written meanwhile carries its trace id (``TraceFilter``),
and the results and accounting events built meanwhile carry it too (``current_trace_id``).

OpenTelemetry spans, one per hop, are made only when an OTLP endpoint is configured
(``configure_tracing``); then the traceparent passed on names this hop's span as the parent.
Off (the default), nothing of OpenTelemetry is imported and a hop costs a context variable.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Iterator
from contextvars import Context, ContextVar, copy_context
from typing import Any

__all__ = [
    "TraceFilter",
    "configure_tracing",
    "continued",
    "current",
    "current_trace_id",
    "flush_spans",
    "hop",
    "new_traceparent",
    "trace_id_of",
    "untraced",
    "valid",
]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_current: ContextVar[str | None] = ContextVar("switchyard_traceparent", default=None)
_tracer: Any = None  # an OpenTelemetry Tracer once configured
_provider: Any = None  # its TracerProvider


def new_traceparent() -> str:
    """A new trace, sampled."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid(traceparent: object) -> str | None:
    """``traceparent`` if it is a well-formed version-00 value (W3C's rules: lowercase hex, the
    ids not all zeros), else None."""
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
        return None
    return match[0]


def continued(traceparent: object) -> str:
    """The caller's trace if it sent a valid one (continued, never replaced), else a new one."""
    return valid(traceparent) or new_traceparent()


def trace_id_of(traceparent: str | None) -> str | None:
    return traceparent[3:35] if traceparent is not None else None


def current() -> str | None:
    """The traceparent of the message this task is handling (None outside one)."""
    return _current.get()


def current_trace_id() -> str | None:
    return trace_id_of(_current.get())


def untraced() -> Context:
    """The context for a task that works for many jobs (a batcher, a flusher, a shared read),
    though a job's hop started it: its log lines carry no one job's trace."""
    context = copy_context()
    context.run(_current.set, None)
    return context


@contextlib.contextmanager
def hop(name: str, traceparent: object) -> Iterator[str | None]:
    """Handle one message of trace ``traceparent`` (None or invalid: untraced) as the current
    trace; with OpenTelemetry on, inside a span named ``name`` whose context is the current
    traceparent (so the next hop is its child). Yields the current traceparent."""
    incoming = valid(traceparent)
    if _tracer is None or incoming is None:
        token = _current.set(incoming)
        try:
            yield incoming
        finally:
            _current.reset(token)
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": incoming})
    with _tracer.start_as_current_span(name, context=parent):
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        own = carrier.get("traceparent", incoming)
        token = _current.set(own)
        try:
            yield own
        finally:
            _current.reset(token)


def configure_tracing(service_name: str, otlp_endpoint: str | None) -> None:
    """Export a span per hop to ``otlp_endpoint`` (OTLP over HTTP, ``…/v1/traces``); None: off."""
    global _tracer, _provider
    flush_spans()
    if otlp_endpoint is None:
        _tracer = _provider = None
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _tracer, _provider = provider.get_tracer("switchyard"), provider


def flush_spans() -> None:
    """Export the spans still buffered (at exit OpenTelemetry does it on its own)."""
    if _provider is not None:
        _provider.force_flush()


class TraceFilter(logging.Filter):
    """Puts the current trace id on every record (``trace_id``), unless the call gave one
    (``extra={"trace_id": ...}``, for a line about another job than the current one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            record.trace_id = current_trace_id()
        return True

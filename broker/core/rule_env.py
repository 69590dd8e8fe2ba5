"""The variables a routing rule may read, each declared to the CEL checker with its type, and the
CEL environment every rule is compiled in. ``RuleContext`` carries them as four plain dicts whose
keys are the field names below::

    request.model string          key.id string               now.hour int     (0-23)
    request.task_type string      key.tags list(string)       now.minute int   (0-59)
    request.priority int          key.consumer string         now.weekday int  (0 = Monday)
    request.estimated_tokens int                              now.date string  ("YYYY-MM-DD")
    request.metadata map(string, dyn)

    provider.id string            provider.day_tokens_used int   provider.p50_latency_ms double
    provider.status string        provider.day_requests int      provider.tags list(string)
      ("up" | "degraded" | "down")                               provider.free bool
    provider.circuit string       provider.error_rate double
      ("closed" | "open" | "half_open")

Each field is declared as its own qualified variable (``provider.day_tokens_used`` is one name,
as the cel-expr-python tests declare ``x.y.foo``): the runtime has no struct types without
protobuf, and maps of ``dyn`` would let the checker see neither field names nor types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from cel_expr_python import cel  # type: ignore[import-untyped]

__all__ = [
    "BOOL",
    "DYN",
    "ENV",
    "ERROR",
    "FIELDS",
    "SECTIONS",
    "VARIABLES",
    "Program",
    "Value",
]

_T = cel.Type
SECTIONS = ("request", "key", "provider", "now")
"""The variables' prefixes, in the order ``RuleContext`` holds them."""
FIELDS: dict[str, dict[str, Any]] = {
    "request": {
        "model": _T.STRING,
        "task_type": _T.STRING,
        "priority": _T.INT,
        "estimated_tokens": _T.INT,
        "metadata": _T.Map(_T.STRING, _T.DYN),
    },
    "key": {"id": _T.STRING, "tags": _T.List(_T.STRING), "consumer": _T.STRING},
    "provider": {
        "id": _T.STRING,
        "status": _T.STRING,
        "circuit": _T.STRING,
        "day_tokens_used": _T.INT,
        "day_requests": _T.INT,
        "error_rate": _T.DOUBLE,
        "p50_latency_ms": _T.DOUBLE,
        "tags": _T.List(_T.STRING),
        "free": _T.BOOL,
    },
    "now": {"hour": _T.INT, "minute": _T.INT, "weekday": _T.INT, "date": _T.STRING},
}

_DECLARED = {
    f"{section}.{name}": cel_type
    for section, fields in FIELDS.items()
    for name, cel_type in fields.items()
}
VARIABLES: Mapping[str, str] = {name: t.name().lower() for name, t in _DECLARED.items()}
"""Every variable a rule may use, with its CEL type name."""


class Value(Protocol):
    def type(self) -> Any: ...
    def value(self) -> Any: ...


class Program(Protocol):
    def eval(self, activation: Any) -> Value: ...
    def return_type(self) -> Any: ...


class _Env(Protocol):
    def Activation(self, data: Mapping[str, Any]) -> Any: ...
    def compile(self, expression: str) -> Program: ...


ENV: _Env = cel.NewEnv(variables=_DECLARED)
BOOL, DYN, ERROR = _T.BOOL, _T.DYN, _T.ERROR

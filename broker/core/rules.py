"""Routing rules: CEL expressions from the config, compiled once per config version and evaluated
for each (job, candidate provider) in the scheduler's hot path (step 5 of "Routing, in order").

A rule is ``when`` (a CEL boolean expression) plus an action:

- ``deny``: when true, this provider is excluded.
- ``require``: when FALSE, this provider is excluded.
- ``prefer`` / ``avoid``: when true, +1 / -1 in this rule's slot of ``Decision.score``.
- ``set_priority``: when true, the job's priority becomes ``value`` (0-9); the highest-priority
  such rule that matches wins.

Rules run in descending ``priority``, ties in file order. A rule with ``providers`` applies only
to those provider ids; for any other provider it is skipped (no effect, not evaluated).

The variables, each declared to the CEL checker with its type. ``RuleContext`` carries them as
four plain dicts whose keys are the field names below::

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

Checked at compile (``CompiledRules.compile`` raises ``ConfigError`` with the rule, the
expression, line:column and a caret): syntax; unknown variables and unknown fields (``foo.bar``,
``provider.day_token_used``); operand types (``provider.day_tokens_used == "a"``; CEL does not
mix int and double, so ``provider.error_rate > 1`` is refused: write ``1.0``); a result type
other than bool. A ``dyn`` result (``request.metadata.urgent``) is accepted and checked when
evaluated.

Checked only at evaluation (the rule counts as not matched: it has no effect on this provider,
the error goes to ``Decision.errors``, nothing raises): a missing map key
(``request.metadata.team`` with no "team": guard with ``has(request.metadata.team)``); a field
missing from the context dicts; a value of the wrong Python type (lists must be ``list``, not
``tuple``); overflow and division by zero; a ``dyn`` result that is not a bool. Note that an
erroring ``require`` rule therefore does not exclude the provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from cel_expr_python import cel  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.core.errors import ConfigError

__all__ = [
    "VARIABLES",
    "CompiledRules",
    "Decision",
    "Rule",
    "RuleAction",
    "RuleContext",
    "RuleError",
    "now_fields",
]

RuleAction = Literal["prefer", "avoid", "require", "deny", "set_priority"]


class Rule(BaseModel):
    """One routing rule as written in the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    when: str = Field(min_length=1, description="A CEL boolean expression.")
    action: RuleAction
    value: int | None = Field(
        default=None, ge=0, le=9, description="The job priority; set_priority only."
    )
    priority: int = Field(default=0, description="Higher runs first; ties in file order.")
    providers: list[str] | None = Field(
        default=None, min_length=1, description="Apply only to these provider ids."
    )

    @model_validator(mode="after")
    def _value_fits_action(self) -> Rule:
        if self.action == "set_priority" and self.value is None:
            raise ValueError("set_priority needs a value (0-9)")
        if self.action != "set_priority" and self.value is not None:
            raise ValueError(f"value is only for set_priority, not {self.action}")
        return self


# --- the CEL environment -------------------------------------------------------------------

_T = cel.Type
_SECTIONS = ("request", "key", "provider", "now")
_FIELDS: dict[str, dict[str, Any]] = {
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
    for section, fields in _FIELDS.items()
    for name, cel_type in fields.items()
}
VARIABLES: Mapping[str, str] = {name: t.name().lower() for name, t in _DECLARED.items()}
"""Every variable a rule may use, with its CEL type name."""


class _Value(Protocol):
    def type(self) -> Any: ...
    def value(self) -> Any: ...


class _Program(Protocol):
    def eval(self, activation: Any) -> _Value: ...
    def return_type(self) -> Any: ...


class _Env(Protocol):
    def Activation(self, data: Mapping[str, Any]) -> Any: ...
    def compile(self, expression: str) -> _Program: ...


_ENV: _Env = cel.NewEnv(variables=_DECLARED)
_BOOL, _DYN, _ERROR = _T.BOOL, _T.DYN, _T.ERROR


# --- evaluation input and output -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleContext:
    """The variables for one (job, provider) evaluation, as plain dicts keyed by field name
    (see the module docstring). Missing keys surface as rule errors, not exceptions."""

    request: Mapping[str, Any]
    key: Mapping[str, Any]
    provider: Mapping[str, Any]
    now: Mapping[str, Any]


def now_fields(moment: datetime) -> dict[str, Any]:
    """The ``now`` dict for ``moment`` (in whatever zone the caller chose, normally UTC)."""
    return {
        "hour": moment.hour,
        "minute": moment.minute,
        "weekday": moment.weekday(),
        "date": moment.date().isoformat(),
    }


@dataclass(frozen=True, slots=True)
class RuleError:
    """A rule that could not be evaluated for one provider; it counted as not matched."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"rule {self.rule!r}: {self.message}"


@dataclass(slots=True)
class Decision:
    """What the rules say about one provider for one job.

    ``score`` has one slot per prefer/avoid rule, in evaluation order (+1, -1 or 0), so
    ``sorted(..., key=lambda d: d.score, reverse=True)`` lets a higher-priority preference
    outrank any number of lower ones, and keeps ties in their original order.
    """

    denied: str | None = None
    required_failed: str | None = None
    score: tuple[int, ...] = ()
    priority: int | None = None
    matched: list[str] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)

    @property
    def excluded(self) -> bool:
        """A deny rule matched, or a require rule did not."""
        return self.denied is not None or self.required_failed is not None


# --- compilation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    program: _Program
    providers: frozenset[str] | None
    slot: int  # index into Decision.score; -1 for actions that do not score


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CompiledRules:
    """A config version's rules, checked and compiled once; ``evaluate`` never parses."""

    __slots__ = ("_bindings", "_compiled", "_slots")

    def __init__(
        self,
        compiled: Sequence[_Compiled],
        bindings: Sequence[tuple[str, int, str]],
        slots: int,
    ) -> None:
        self._compiled = tuple(compiled)
        self._bindings = tuple(bindings)
        self._slots = slots

    @classmethod
    def compile(cls, rules: Sequence[Rule]) -> CompiledRules:
        """Compile every rule; the first failure raises ``ConfigError`` naming the rule."""
        seen: dict[str, int] = {}
        for index, rule in enumerate(rules):
            if rule.name in seen:
                first = seen[rule.name]
                raise ConfigError(
                    f"rules.{index} ({rule.name}): duplicate name (see rules.{first})"
                )
            seen[rule.name] = index
        ordered = sorted(enumerate(rules), key=lambda pair: -pair[1].priority)
        compiled: list[_Compiled] = []
        identifiers: set[str] = set()
        slots = 0
        for index, rule in ordered:
            program = _compile_one(index, rule)
            scores = rule.action in ("prefer", "avoid")
            compiled.append(
                _Compiled(
                    rule=rule,
                    program=program,
                    providers=frozenset(rule.providers) if rule.providers is not None else None,
                    slot=slots if scores else -1,
                )
            )
            slots += int(scores)
            identifiers.update(_IDENT.findall(rule.when))
        # Bind only the variables some rule may use: building the activation costs per variable.
        # Any identifier token counts, so this is a superset of what the checker resolved.
        bindings = [
            (f"{section}.{name}", position, name)
            for position, section in enumerate(_SECTIONS)
            if section in identifiers
            for name in _FIELDS[section]
            if name in identifiers
        ]
        return cls(compiled, bindings, slots)

    @property
    def rules(self) -> list[Rule]:
        """The rules in evaluation order."""
        return [c.rule for c in self._compiled]

    def __len__(self) -> int:
        return len(self._compiled)

    def evaluate(self, context: RuleContext) -> Decision:
        """Apply every rule to one provider; never raises (errors go to ``Decision.errors``)."""
        decision = Decision()
        if not self._compiled:
            return decision
        sections = (context.request, context.key, context.provider, context.now)
        data: dict[str, Any] = {}
        for variable, position, name in self._bindings:
            section = sections[position]
            if name in section:
                data[variable] = section[name]
        failure: str | None = None
        try:
            activation = _ENV.Activation(data)
        except Exception as exc:  # a value the runtime cannot take at all
            failure = f"cannot bind the variables: {type(exc).__name__}: {exc}"
        provider_id = context.provider.get("id")
        score = [0] * self._slots
        for compiled in self._compiled:
            rule = compiled.rule
            if compiled.providers is not None and provider_id not in compiled.providers:
                continue
            if failure is not None:
                decision.errors.append(RuleError(rule.name, failure))
                continue
            try:
                result = compiled.program.eval(activation)
                value = result.value()
                if not isinstance(value, bool):
                    raise _NotBool(result)
            except Exception as exc:
                decision.errors.append(RuleError(rule.name, _eval_message(exc)))
                continue
            action = rule.action
            if value:
                decision.matched.append(rule.name)
                if action == "deny":
                    if decision.denied is None:
                        decision.denied = rule.name
                elif action == "prefer":
                    score[compiled.slot] = 1
                elif action == "avoid":
                    score[compiled.slot] = -1
                elif action == "set_priority" and decision.priority is None:
                    decision.priority = rule.value
            elif action == "require" and decision.required_failed is None:
                decision.required_failed = rule.name
        decision.score = tuple(score)
        return decision


class _NotBool(Exception):
    def __init__(self, result: _Value) -> None:
        self.result = result


def _eval_message(exc: Exception) -> str:
    if not isinstance(exc, _NotBool):
        return f"{type(exc).__name__}: {exc}"
    result = exc.result
    if result.type() == _ERROR:
        return str(result.value())
    return f"evaluated to {result.type().name().lower()} {result.value()!r}, not a bool"


def _compile_one(index: int, rule: Rule) -> _Program:
    where = f"rules.{index} ({rule.name}): invalid `when` expression {rule.when!r}"
    try:
        program = _ENV.compile(rule.when)
    except Exception as exc:
        problems = _parse_issues(str(exc))
        raise ConfigError("\n".join([where, *(_show(rule.when, *p) for p in problems)])) from None
    result_type = program.return_type()
    if result_type != _BOOL and result_type != _DYN:
        reason = f"must be a boolean expression, but its type is {result_type.name().lower()}"
        raise ConfigError(f"{where}\n{_show(rule.when, 1, 1, reason)}")
    return program


# cel-cpp reports "ERROR: <input>:LINE:COL: reason", then " | source" and " | ...^" lines.
_ISSUE = re.compile(r"^ERROR: <input>:(\d+):(\d+): (.*)$")
_STATUS = re.compile(r"^[A-Z_]+: (?=ERROR: )|\s*\[[A-Z_]+\]\s*$")
_UNDECLARED = re.compile(r"undeclared reference to '([^']*)'")


def _parse_issues(text: str) -> list[tuple[int | None, int | None, str]]:
    issues: list[tuple[int | None, int | None, str]] = []
    for line in _STATUS.sub("", text).splitlines():
        match = _ISSUE.match(line)
        if match:
            reason = _hint(match.group(3).replace(" (in container '')", ""))
            issues.append((int(match.group(1)), int(match.group(2)), reason))
        elif issues and not line.startswith(" | "):
            line_no, column, reason = issues[-1]
            issues[-1] = (line_no, column, f"{reason}\n{line}")
    return issues or [(None, None, text)]


def _hint(reason: str) -> str:
    undeclared = _UNDECLARED.search(reason)
    if undeclared:
        root = undeclared.group(1).split(".", 1)[0]
        if root in _FIELDS:
            return f"{reason} ({root} has: {', '.join(_FIELDS[root])})"
        return f"{reason} (the variables are: {', '.join(_SECTIONS)})"
    if "(double, int)" in reason or "(int, double)" in reason:
        return f"{reason} (CEL does not mix int and double: write 1.0, or use double()/int())"
    return reason


def _show(expression: str, line_no: int | None, column: int | None, reason: str) -> str:
    """``  L:C: reason`` then the source line and a caret under column C (1-based)."""
    if line_no is None or column is None:
        return f"  {reason}"
    lines = expression.split("\n")
    source = lines[line_no - 1].rstrip("\r") if 0 < line_no <= len(lines) else ""
    # Keep tabs so the caret lines up with the source as a terminal renders it.
    pad = "".join("\t" if ch == "\t" else " " for ch in source[: column - 1])
    pad += " " * max(0, column - 1 - len(source))
    return f"  {line_no}:{column}: {reason}\n    | {source}\n    | {pad}^"

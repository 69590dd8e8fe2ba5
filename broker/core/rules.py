"""Routing rules: CEL expressions from the config, compiled once per config version and evaluated
for each (job, candidate provider) in the scheduler's hot path (step 5 of "Routing, in order").

A rule is ``when`` (a CEL boolean expression over ``broker.core.rule_env``'s variables) plus an
action:

- ``deny``: when true, this provider is excluded.
- ``require``: when FALSE, this provider is excluded.
- ``prefer`` / ``avoid``: when true, +1 / -1 in this rule's slot of ``Decision.score``.
- ``set_priority``: when true, the job's priority becomes ``value`` (0-9); the highest-priority
  such rule that matches wins.

Rules run in descending ``priority``, ties in file order. A rule with ``providers`` applies only
to those provider ids; for any other provider it is skipped (no effect, not evaluated).

What compiling checks is in ``broker.core.rule_diagnostics``. Checked only at evaluation (the
rule counts as not matched: it has no effect on this provider, the error goes to
``Decision.errors``, nothing raises): a missing map key (``request.metadata.team`` with no "team":
guard with ``has(request.metadata.team)``); a field missing from the context dicts; a value of the
wrong Python type (lists must be ``list``, not ``tuple``); overflow and division by zero; a
``dyn`` result that is not a bool. Note that an erroring ``require`` rule therefore does not
exclude the provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from broker.core.errors import ConfigError
from broker.core.rule_diagnostics import compile_when
from broker.core.rule_env import ENV, ERROR, FIELDS, SECTIONS, VARIABLES, Program, Value
from broker.core.strict import StrictModel

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


class Rule(StrictModel):
    """One routing rule as written in the config."""

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


# --- evaluation input and output -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleContext:
    """The variables for one (job, provider) evaluation, as plain dicts keyed by field name
    (``broker.core.rule_env``). Missing keys surface as rule errors, not exceptions."""

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
    """What the rules say about one provider for one job. ``score`` (+1, -1 or 0 per prefer/avoid
    rule, in evaluation order) sorts one higher-priority preference above any number of lower."""

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


# --- compilation and evaluation --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    program: Program
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
        _refuse_duplicate_names(rules)
        ordered = sorted(enumerate(rules), key=lambda pair: -pair[1].priority)
        compiled: list[_Compiled] = []
        identifiers: set[str] = set()
        slots = 0
        for index, rule in ordered:
            scores = rule.action in ("prefer", "avoid")
            compiled.append(
                _Compiled(
                    rule=rule,
                    program=compile_when(index, rule.name, rule.when),
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
            for position, section in enumerate(SECTIONS)
            if section in identifiers
            for name in FIELDS[section]
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
        activation, failure = self._bind(context)
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
                value = _run(compiled.program, activation)
            except Exception as exc:
                decision.errors.append(RuleError(rule.name, _eval_message(exc)))
                continue
            _apply(decision, compiled, value, score)
        decision.score = tuple(score)
        return decision

    def _bind(self, context: RuleContext) -> tuple[Any, str | None]:
        """The CEL activation of the variables some rule reads, or why there can be none."""
        sections = (context.request, context.key, context.provider, context.now)
        data: dict[str, Any] = {}
        for variable, position, name in self._bindings:
            section = sections[position]
            if name in section:
                data[variable] = section[name]
        try:
            return ENV.Activation(data), None
        except Exception as exc:  # a value the runtime cannot take at all
            return None, f"cannot bind the variables: {type(exc).__name__}: {exc}"


def _refuse_duplicate_names(rules: Sequence[Rule]) -> None:
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.name in seen:
            first = seen[rule.name]
            raise ConfigError(f"rules.{index} ({rule.name}): duplicate name (see rules.{first})")
        seen[rule.name] = index


def _run(program: Program, activation: Any) -> bool:
    result = program.eval(activation)
    value = result.value()
    if not isinstance(value, bool):
        raise _NotBool(result)
    return value


def _apply(decision: Decision, compiled: _Compiled, matched: bool, score: list[int]) -> None:
    """One rule's effect on the decision (the first deny, require and set_priority win)."""
    rule = compiled.rule
    action = rule.action
    if matched:
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


class _NotBool(Exception):
    def __init__(self, result: Value) -> None:
        self.result = result


def _eval_message(exc: Exception) -> str:
    if not isinstance(exc, _NotBool):
        return f"{type(exc).__name__}: {exc}"
    result = exc.result
    if result.type() == ERROR:
        return str(result.value())
    return f"evaluated to {result.type().name().lower()} {result.value()!r}, not a bool"

"""Step 5 of "Routing, in order": the config's rules applied to each candidate. ``deny`` and
``require`` drop it, ``prefer`` and ``avoid`` score it, ``set_priority`` gives the job a priority
on it (``broker.core.rules`` says how rules run)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from broker.core.config import KeyConfig
from broker.core.rules import CompiledRules, Decision, RuleContext, now_fields
from broker.scheduler.candidates import (
    UNKNOWN_STATE,
    Candidate,
    Dropped,
    ProviderState,
    measured_error_rate,
    measured_p50,
)
from schemas import CompletionJob

__all__ = ["Ruled", "apply_rules", "preferred_by"]


@dataclass(frozen=True, slots=True)
class Ruled:
    """The candidates the rules kept (each with its score), and what the route records of them."""

    kept: list[Candidate]
    matched: list[str]  # every rule that matched for any candidate, in rule order
    priorities: dict[str, int]  # the job priority a set_priority rule gave, by candidate label
    errors: list[str]  # rules that could not be evaluated, by candidate label


def apply_rules(
    rules: CompiledRules,
    job: CompletionJob,
    key: KeyConfig | None,
    candidates: list[Candidate],
    states: Mapping[str, ProviderState],
    now: datetime,
    zone: ZoneInfo,
    dropped: list[Dropped],
) -> Ruled:
    """Drop what deny/require exclude (into ``dropped``); score prefer/avoid; collect
    set_priority. ``now`` is read in ``zone``, the config's time zone."""
    if not len(rules):
        return Ruled(candidates, [], {}, [])
    clock = now_fields(now.astimezone(zone))
    key_fields = _key_fields(key)
    kept: list[Candidate] = []
    matched: set[str] = set()
    priorities: dict[str, int] = {}
    errors: list[str] = []
    for candidate in candidates:
        state = states.get(candidate.provider.id, UNKNOWN_STATE)
        decision = rules.evaluate(
            RuleContext(
                request=_request_fields(job, candidate),
                key=key_fields,
                provider=_provider_fields(candidate, state),
                now=clock,
            )
        )
        matched.update(decision.matched)
        errors.extend(f"{candidate.label}: {error}" for error in decision.errors)
        excluded = _excluded_by(decision)
        if excluded is not None:
            dropped.append(Dropped(candidate.provider.id, candidate.model, excluded))
            continue
        if decision.priority is not None:
            priorities[candidate.label] = decision.priority
        kept.append(replace(candidate, score=decision.score))
    in_rule_order = [r.name for r in rules.rules if r.name in matched]
    return Ruled(kept, in_rule_order, priorities, errors)


def preferred_by(rules: CompiledRules, candidate: Candidate) -> str | None:
    """The highest-priority prefer rule that matched ``candidate``, if any."""
    scoring = [r for r in rules.rules if r.action in ("prefer", "avoid")]
    return next(
        (r.name for r, slot in zip(scoring, candidate.score, strict=False) if slot > 0),
        None,
    )


def _key_fields(key: KeyConfig | None) -> dict[str, Any]:
    return {
        "id": key.id if key else "",
        "tags": list(key.tags) if key else [],
        "consumer": (key.consumer or "") if key else "",
    }


def _request_fields(job: CompletionJob, candidate: Candidate) -> dict[str, Any]:
    # `request.model` is the public model this candidate serves: for a job routed by task type
    # it is the route's model, not None.
    return {
        "model": candidate.public_model,
        "task_type": job.task_type or "",
        "priority": job.priority,
        "estimated_tokens": candidate.est_tokens,
        "metadata": job.metadata,
    }


def _provider_fields(candidate: Candidate, state: ProviderState) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": candidate.provider.id,
        "status": state.status,
        "circuit": state.circuit,
        "day_tokens_used": state.day_tokens_used,
        "day_requests": state.day_requests,
        "error_rate": measured_error_rate(state, candidate.model),
        "tags": list(candidate.provider.tags),
        "free": candidate.free,
    }
    latency = measured_p50(state, candidate.model)
    if latency is not None:  # unknown: a rule reading it errors and does not match
        fields["p50_latency_ms"] = float(latency)
    return fields


def _excluded_by(decision: Decision) -> str | None:
    if decision.denied is not None:
        return f"denied by rule {decision.denied!r}"
    if decision.required_failed is not None:
        return f"rule {decision.required_failed!r} (require) not met"
    return None

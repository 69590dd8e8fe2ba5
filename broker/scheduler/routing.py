"""Which provider a job goes to: steps 1-7 of "Routing, in order" (ARCHITECTURE.md) as a pure
function of the job, the config, a snapshot of provider state and the time.

No Redis, no AMQP, no wall clock: the scheduler builds ``ProviderState`` from Redis, passes
``now``, and plugs quota reservation in as ``can_reserve``, which is called on candidates in
order and stops at the first that returns true (so it may reserve as a side effect).

Policies order the candidates left after health and rules; each breaks ties by the next
criterion shown, then by config order::

    free_first   free quota left first, then estimated cost, then p50 latency
    cheapest     estimated cost (list price x the discount in force at ``now``), free first
    fastest      p50 latency (unknown last), then cost
    weighted     a random order drawn with probability proportional to ``weight``, seeded by
                 the job id, so a redelivered job routes the same way
    round_robin  config order rotated by ``rr_counter`` (the scheduler keeps the counter)
    priority     provider ``priority`` (lower first), then free first, then cost

Rules go first: a provider a ``prefer`` rule matched is ahead of every one it did not, whatever
the policy; ``avoid`` puts a provider behind. Estimated cost = prompt tokens (estimated for the
provider's tokenizer family, tools included) at the input price + output tokens (the job's
``max_tokens``, else the model's, else ``DEFAULT_OUTPUT_TOKENS``) at the output price, times the
discount multiplier. It is the list price even where a free tier will make the call free.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from broker.core.config import (
    Config,
    Discount,
    KeyConfig,
    Policy,
    ProviderConfig,
    ProviderType,
    Serving,
)
from broker.core.errors import ModelUnavailable
from broker.core.pricing import cost_usd
from broker.core.rules import Decision, RuleContext, now_fields
from broker.core.tokens import estimate_prompt_tokens
from schemas import CompletionJob, Route

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "Candidate",
    "Dropped",
    "ProviderState",
    "RouteDecision",
    "Router",
]

DEFAULT_OUTPUT_TOKENS = 1024
"""Output tokens assumed when neither the job nor the model sets ``max_tokens``."""


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What the scheduler knows of one provider right now (a snapshot built from Redis)."""

    status: str = "up"  # up | degraded | down
    circuit: str = "closed"  # closed | open | half_open
    open_s: float = 0.0  # while the circuit is open: seconds until a call may try again
    day_tokens_used: int = 0
    day_requests: int = 0
    error_rate: float = 0.0
    p50_latency_ms: float | None = None
    free_remaining: bool = True  # the free tier (if any) still has quota for this job


_UNKNOWN = ProviderState()
CIRCUIT_OPEN = "circuit open"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (provider, upstream model) a job may go to, with what routing estimated for it."""

    provider: ProviderConfig
    model: str
    public_model: str
    free: bool
    est_cost_usd: Decimal
    est_prompt_tokens: int
    est_output_tokens: int
    multiplier: Decimal = Decimal(1)
    discount: Discount | None = None
    p50_latency_ms: float | None = None
    score: tuple[int, ...] = ()  # the rules' prefer/avoid slots (``Decision.score``)

    @property
    def est_tokens(self) -> int:
        return self.est_prompt_tokens + self.est_output_tokens

    @property
    def label(self) -> str:
        return f"{self.provider.id}/{self.model}"


@dataclass(frozen=True, slots=True)
class Dropped:
    """A (provider, model) routing did not keep, and why."""

    provider: str
    model: str
    reason: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}: {self.reason}"


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer: the chosen candidate, the failover list in order, and the record.

    ``priorities``: the job priority a ``set_priority`` rule gave, by candidate label (absent:
    keep the job's); ``priority`` is the chosen one's. ``matched_rules``: every rule that matched
    for any candidate, in rule order.
    """

    chosen: Candidate
    alternatives: list[Candidate]
    policy: Policy
    reason: str
    priorities: dict[str, int] = field(default_factory=dict)
    matched_rules: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    rule_errors: list[str] = field(default_factory=list)

    @property
    def priority(self) -> int | None:
        return self.priorities.get(self.chosen.label)

    def to_route(
        self,
        scheduled_at: datetime,
        *,
        admitted: tuple[Candidate, list[Candidate]] | None = None,
        reservation_id: str | None = None,
        key_id: str | None = None,
    ) -> Route:
        """The ``Route`` carried on the job (alternatives as provider ids). ``admitted``: the
        candidate quota admitted and what is left after it, when it was not the first choice."""
        chosen, alternatives = admitted or (self.chosen, self.alternatives)
        reason = self.reason if chosen is self.chosen else f"quota: {chosen.label}; {self.reason}"
        return Route(
            provider=chosen.provider.id,
            model=chosen.model,
            public_model=chosen.public_model,
            reason=reason,
            alternatives=[c.provider.id for c in alternatives],
            scheduled_at=scheduled_at,
            policy=self.policy,
            free=chosen.free,
            reservation_id=reservation_id,
            key_id=key_id,
        )


class Router:
    """Routes jobs under one config version (rules compiled once, with the config)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._rules = config.compiled_rules

    def route(
        self,
        job: CompletionJob,
        *,
        key: KeyConfig | None,
        states: Mapping[str, ProviderState],
        now: datetime,
        can_reserve: Callable[[Candidate], bool] | None = None,
        rr_counter: int = 0,
        exclude: Collection[str] = (),
    ) -> RouteDecision:
        """Choose a provider for ``job``; ``ModelUnavailable`` says why when none can take it.
        Providers in ``exclude`` (failover: those that failed the job) are dropped."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        public_models, policy = self._public_models(job, key)
        dropped: list[Dropped] = []
        prompt_tokens: dict[ProviderType, int] = {}
        candidates: list[Candidate] = []
        for serving in self.config.serving(public_models):
            provider = serving.provider
            state = states.get(provider.id, _UNKNOWN)
            reason = "failed this job already" if provider.id in exclude else None
            reason = reason or _unusable(job, provider, state)
            if reason is not None:
                dropped.append(Dropped(provider.id, serving.model, reason))
                continue
            candidates.append(self._candidate(job, serving, state, now, prompt_tokens))

        kept, matched, priorities, errors = self._apply_rules(
            job, key, candidates, states, now, dropped
        )
        ordered = _order(policy, kept, job.job_id, rr_counter)
        ordered.sort(key=lambda c: tuple(-slot for slot in c.score))  # stable: rules, then policy

        for index, candidate in enumerate(ordered):
            if can_reserve is None or can_reserve(candidate):
                return RouteDecision(
                    chosen=candidate,
                    alternatives=ordered[index + 1 :],
                    policy=policy,
                    reason=self._reason(policy, candidate, ordered, index, rr_counter),
                    priorities=priorities,
                    matched_rules=matched,
                    dropped=dropped,
                    rule_errors=errors,
                )
            dropped.append(
                Dropped(candidate.provider.id, candidate.model, "quota cannot be reserved")
            )
        # Circuits close on their own: say when the first of them lets a call try again.
        opens = [
            states.get(d.provider, _UNKNOWN).open_s for d in dropped if d.reason == CIRCUIT_OPEN
        ]
        raise ModelUnavailable(
            f"no provider can take {_asked(job, public_models)} now:"
            f" {'; '.join(str(d) for d in dropped)}",
            retry_after=round(min(opens), 3) if opens else None,
        )

    # --- steps ---------------------------------------------------------------------------

    def _public_models(self, job: CompletionJob, key: KeyConfig | None) -> tuple[list[str], Policy]:
        """Steps 1-3: the key's scopes, then the explicit model, task route or default model."""
        if key is not None and job.model is not None and not key.allows(job.model):
            raise ModelUnavailable(
                f"key {key.id!r} may not use model {job.model!r}"
                f" (its scopes: {', '.join(key.scopes)})"
            )
        models, policy = self.config.resolve(job.model, job.task_type)
        if key is not None:
            allowed = [m for m in models if key.allows(m)]
            if not allowed:
                raise ModelUnavailable(
                    f"key {key.id!r} may not use any of {', '.join(models)}"
                    f" (its scopes: {', '.join(key.scopes)})"
                )
            models = allowed
        return models, policy

    def _candidate(
        self,
        job: CompletionJob,
        serving: Serving,
        state: ProviderState,
        now: datetime,
        prompt_tokens: dict[ProviderType, int],
    ) -> Candidate:
        provider = serving.provider
        family = provider.type
        if family not in prompt_tokens:
            prompt_tokens[family] = estimate_prompt_tokens(job.messages, family, job.params.tools)
        prompt = prompt_tokens[family]
        spec = provider.models[serving.model]
        output = job.params.max_tokens or spec.max_tokens or DEFAULT_OUTPUT_TOKENS
        discount = spec.discount_at(now, self.config.zone)
        multiplier = discount.multiplier if discount is not None else Decimal(1)
        return Candidate(
            provider=provider,
            model=serving.model,
            public_model=serving.public_model,
            free=provider.free_tier is not None and state.free_remaining,
            est_cost_usd=cost_usd(spec, prompt, output, multiplier),
            est_prompt_tokens=prompt,
            est_output_tokens=output,
            multiplier=multiplier,
            discount=discount,
            p50_latency_ms=state.p50_latency_ms,
        )

    def _apply_rules(
        self,
        job: CompletionJob,
        key: KeyConfig | None,
        candidates: list[Candidate],
        states: Mapping[str, ProviderState],
        now: datetime,
        dropped: list[Dropped],
    ) -> tuple[list[Candidate], list[str], dict[str, int], list[str]]:
        """Step 5: drop what deny/require exclude; score prefer/avoid; collect set_priority."""
        if not len(self._rules):
            return candidates, [], {}, []
        clock = now_fields(now.astimezone(self.config.zone))
        key_fields = {
            "id": key.id if key else "",
            "tags": list(key.tags) if key else [],
            "consumer": (key.consumer or "") if key else "",
        }
        kept: list[Candidate] = []
        matched: set[str] = set()
        priorities: dict[str, int] = {}
        errors: list[str] = []
        for candidate in candidates:
            state = states.get(candidate.provider.id, _UNKNOWN)
            decision = self._rules.evaluate(
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
        in_rule_order = [r.name for r in self._rules.rules if r.name in matched]
        return kept, in_rule_order, priorities, errors

    def _reason(
        self,
        policy: Policy,
        chosen: Candidate,
        ordered: list[Candidate],
        skipped: int,
        rr_counter: int,
    ) -> str:
        """A short sentence for people: why this one."""
        count = len(ordered)
        if policy == "free_first":
            if chosen.free:
                text = f"free tier first ({chosen.provider.id} has free quota left)"
            elif any(c.provider.free_tier is not None for c in ordered):
                text = f"free tier first: no free quota left, cheapest of {count}"
            else:
                text = f"free tier first: none has a free tier, cheapest of {count}"
        elif policy == "cheapest":
            text = f"cheapest of {count}"
        elif policy == "fastest":
            latency = chosen.p50_latency_ms
            text = f"fastest of {count} " + (
                f"(p50 {latency:.0f} ms)" if latency is not None else "(latency unknown)"
            )
        elif policy == "weighted":
            total = sum(c.provider.weight for c in ordered)
            text = f"weighted choice of {count} (weight {chosen.provider.weight:g} of {total:g})"
        elif policy == "round_robin":
            text = f"round robin over {count} (turn {rr_counter})"
        else:
            text = f"priority {chosen.provider.priority}, first of {count}"
        if count == 1:
            text = "the only candidate" + (" (free tier)" if chosen.free else "")
        if chosen.discount is not None and not chosen.free:
            text += f" (discount {chosen.discount.describe(self.config.timezone)})"
        preferred = self._preferred_by(chosen)
        if preferred:
            text = f"preferred by rule {preferred!r}; {text}"
        if skipped:
            text += f"; {skipped} skipped: quota cannot be reserved"
        return text

    def _preferred_by(self, candidate: Candidate) -> str | None:
        """The highest-priority prefer rule that matched ``candidate``, if any."""
        scoring = [r for r in self._rules.rules if r.action in ("prefer", "avoid")]
        return next(
            (r.name for r, slot in zip(scoring, candidate.score, strict=False) if slot > 0),
            None,
        )


# --- helpers -------------------------------------------------------------------------------


def _asked(job: CompletionJob, public_models: list[str]) -> str:
    if job.model is None and job.task_type is not None:
        return f"task_type {job.task_type!r} ({', '.join(public_models)})"
    return f"model {public_models[0]!r}"


def _unusable(job: CompletionJob, provider: ProviderConfig, state: ProviderState) -> str | None:
    """Step 4 (health) and the provider's task types: why it cannot take the job, or None."""
    routed_by_task = job.model is None and job.task_type is not None
    if routed_by_task and provider.task_types and job.task_type not in provider.task_types:
        return f"serves task types {', '.join(provider.task_types)} only"
    if state.circuit == "open":
        return CIRCUIT_OPEN
    if state.status == "down":
        return "down"
    return None


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
        "error_rate": float(state.error_rate),
        "tags": list(candidate.provider.tags),
        "free": candidate.free,
    }
    if state.p50_latency_ms is not None:  # unknown: a rule reading it errors and does not match
        fields["p50_latency_ms"] = float(state.p50_latency_ms)
    return fields


def _excluded_by(decision: Decision) -> str | None:
    if decision.denied is not None:
        return f"denied by rule {decision.denied!r}"
    if decision.required_failed is not None:
        return f"rule {decision.required_failed!r} (require) not met"
    return None


def _latency(candidate: Candidate) -> tuple[bool, float]:
    latency = candidate.p50_latency_ms
    return (latency is None, latency if latency is not None else 0.0)


def _order(policy: Policy, candidates: list[Candidate], job_id: str, rr: int) -> list[Candidate]:
    """Step 6: the policy's order (stable, so config order breaks the remaining ties)."""
    if policy == "free_first":
        return sorted(candidates, key=lambda c: (not c.free, c.est_cost_usd, _latency(c)))
    if policy == "cheapest":
        return sorted(candidates, key=lambda c: (c.est_cost_usd, not c.free, _latency(c)))
    if policy == "fastest":
        return sorted(candidates, key=lambda c: (_latency(c), c.est_cost_usd))
    if policy == "priority":
        return sorted(candidates, key=lambda c: (c.provider.priority, not c.free, c.est_cost_usd))
    if policy == "round_robin":
        turn = rr % len(candidates) if candidates else 0
        return candidates[turn:] + candidates[:turn]
    # weighted: Efraimidis-Spirakis keys log(u) / w, largest first, with u drawn from the job id
    # (the first place goes to each candidate with probability weight / total weight).
    return sorted(candidates, key=lambda c: -_weighted_key(job_id, c))


def _weighted_key(job_id: str, candidate: Candidate) -> float:
    digest = hashlib.sha256(f"{job_id}\0{candidate.provider.id}\0{candidate.model}".encode())
    uniform = (int.from_bytes(digest.digest()[:8], "big") + 0.5) / 2.0**64
    return math.log(uniform) / candidate.provider.weight

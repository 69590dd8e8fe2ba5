"""Which provider a job goes to: steps 1-6 of "Routing, in order" (docs/architecture.md) as a pure
function of the job, the config, a snapshot of provider state and the time.

No Redis, no AMQP, no wall clock: the scheduler builds ``ProviderState`` from Redis, passes
``now``, and plugs quota reservation in as ``can_reserve``, which is called on candidates in
order and stops at the first that returns true (so it may reserve as a side effect).

The steps live where their idea does: the candidates and their estimates in
``broker.scheduler.candidates``, the rules in ``broker.scheduler.routing_rules``, the policies in
``broker.scheduler.policies``. Rules go first: a provider a ``prefer`` rule matched is ahead of
every one it did not, whatever the policy; ``avoid`` puts a provider behind.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from broker.core.config import Config, KeyConfig, Policy, ProviderType
from broker.core.errors import Forbidden, NoCapableModel, NoProviderAvailable
from broker.scheduler.candidates import (
    CIRCUIT_OPEN,
    DEFAULT_OUTPUT_TOKENS,
    UNKNOWN_STATE,
    Candidate,
    Dropped,
    ProviderState,
    lacks,
    make_candidate,
    unusable,
)
from broker.scheduler.policies import order, why_first
from broker.scheduler.routing_rules import apply_rules, preferred_by
from schemas import CompletionJob, Route

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "Candidate",
    "Dropped",
    "ProviderState",
    "RouteDecision",
    "Router",
]


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer: the chosen candidate, the failover list in order, and the record of
    why, which the job's route and the logs carry."""

    chosen: Candidate
    alternatives: list[Candidate]
    policy: Policy
    reason: str
    # The job priority a set_priority rule gave, by candidate label (absent: keep the job's).
    priorities: dict[str, int] = field(default_factory=dict)
    # Every rule that matched for any candidate, in rule order.
    matched_rules: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    rule_errors: list[str] = field(default_factory=list)

    @property
    def priority(self) -> int | None:
        """The priority a rule gave the chosen candidate, if one did."""
        return self.priorities.get(self.chosen.label)

    def to_route(
        self,
        scheduled_at: datetime,
        *,
        admitted: tuple[Candidate, list[Candidate]] | None = None,
        reservation_id: str | None = None,
        key_id: str | None = None,
        quota_epoch: str | None = None,
    ) -> Route:
        """The ``Route`` carried on the job (alternatives as provider ids). ``admitted``: the
        candidate quota admitted (as reserved, its output cap perhaps sized) and what is left
        after it."""
        chosen, alternatives = admitted or (self.chosen, self.alternatives)
        first = (chosen.label, chosen.free) == (self.chosen.label, self.chosen.free)
        reason = self.reason if first else f"quota: {chosen.label}; {self.reason}"
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
            quota_epoch=quota_epoch,
            key_id=key_id,
            output_cap=chosen.output_cap,
            est_prompt_tokens=chosen.est_prompt_tokens,
            est_completion_tokens=chosen.est_output_tokens,
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
        """Choose a provider for ``job``; ``NoProviderAvailable`` says why when none can take it.
        Providers in ``exclude`` (failover: those that failed the job) are dropped."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        public_models, policy = self._public_models(job, key)
        dropped: list[Dropped] = []
        candidates = self._candidates(job, public_models, states, now, exclude, dropped)
        ruled = apply_rules(
            self._rules, job, key, candidates, states, now, self.config.zone, dropped
        )
        ordered = order(policy, ruled.kept, job.job_id, rr_counter)
        ordered.sort(key=lambda c: tuple(-slot for slot in c.score))  # stable: rules, then policy

        for index, candidate in enumerate(ordered):
            if can_reserve is None or can_reserve(candidate):
                return RouteDecision(
                    chosen=candidate,
                    alternatives=ordered[index + 1 :],
                    policy=policy,
                    reason=self._reason(policy, candidate, ordered, index, rr_counter),
                    priorities=ruled.priorities,
                    matched_rules=ruled.matched,
                    dropped=dropped,
                    rule_errors=ruled.errors,
                )
            dropped.append(
                Dropped(candidate.provider.id, candidate.model, "quota cannot be reserved")
            )
        # Circuits close on their own: say when the first of them lets a call try again.
        opens = [
            states.get(d.provider, UNKNOWN_STATE).open_s
            for d in dropped
            if d.reason == CIRCUIT_OPEN
        ]
        unservable = dropped and all(d.lasting for d in dropped)
        raise (NoCapableModel if unservable else NoProviderAvailable)(
            f"no provider can take {_asked(job, public_models)} now:"
            f" {'; '.join(str(d) for d in dropped)}",
            retry_after=round(min(opens), 3) if opens else None,
        )

    # --- steps ---------------------------------------------------------------------------

    def _public_models(self, job: CompletionJob, key: KeyConfig | None) -> tuple[list[str], Policy]:
        """Steps 1-3: the key's scopes, then the explicit model, task route or default model."""
        if key is not None and job.model is not None and not key.allows(job.model):
            raise Forbidden(
                f"key {key.id!r} may not use model {job.model!r}"
                f" (its scopes: {', '.join(key.scopes)})"
            )
        models, policy = self.config.resolve(job.model, job.task_type)
        if key is not None:
            allowed = [m for m in models if key.allows(m)]
            if not allowed:
                raise Forbidden(
                    f"key {key.id!r} may not use any of {', '.join(models)}"
                    f" (its scopes: {', '.join(key.scopes)})"
                )
            models = allowed
        return models, policy

    def _candidates(
        self,
        job: CompletionJob,
        public_models: list[str],
        states: Mapping[str, ProviderState],
        now: datetime,
        exclude: Collection[str],
        dropped: list[Dropped],
    ) -> list[Candidate]:
        """Step 4: every provider serving the models that can take the job; the rest, with
        why, into ``dropped``."""
        prompt_tokens: dict[ProviderType, int] = {}
        candidates: list[Candidate] = []
        for serving in self.config.serving(public_models):
            provider = serving.provider
            state = states.get(provider.id, UNKNOWN_STATE)
            reason = "failed this job already" if provider.id in exclude else None
            reason = reason or unusable(job, provider, state)
            if reason is not None:
                lasting = reason not in (CIRCUIT_OPEN, "down", "failed this job already")
                dropped.append(Dropped(provider.id, serving.model, reason, lasting))
                continue
            candidate = make_candidate(job, serving, state, now, self.config.zone, prompt_tokens)
            missing = lacks(job, candidate)
            if missing is not None:
                dropped.append(Dropped(provider.id, serving.model, missing, lasting=True))
                continue
            candidates.append(candidate)
        return candidates

    def _reason(
        self,
        policy: Policy,
        chosen: Candidate,
        ordered: list[Candidate],
        skipped: int,
        rr_counter: int,
    ) -> str:
        """A short sentence for people: why this one."""
        text = why_first(policy, chosen, ordered, rr_counter)
        if len(ordered) == 1:
            text = "the only candidate" + (" (free tier)" if chosen.free else "")
        if chosen.discount is not None and not chosen.free:
            text += f" (discount {chosen.discount.describe(self.config.timezone)})"
        preferred = preferred_by(self._rules, chosen)
        if preferred:
            text = f"preferred by rule {preferred!r}; {text}"
        if skipped:
            text += f"; {skipped} skipped: quota cannot be reserved"
        return text


def _asked(job: CompletionJob, public_models: list[str]) -> str:
    if job.model is None and job.task_type is not None:
        return f"task_type {job.task_type!r} ({', '.join(public_models)})"
    return f"model {public_models[0]!r}"

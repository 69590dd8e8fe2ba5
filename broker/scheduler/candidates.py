"""Steps 3 and 4 of "Routing, in order" (docs/architecture.md), up to the rules: which (provider,
upstream model) pairs may take a job, and what each would cost.

Estimated cost = prompt tokens (estimated for the provider's tokenizer family, tools included)
at the input price + output tokens (the job's own cap, else the model's, else
``DEFAULT_OUTPUT_TOKENS``) at the output price, times the discount multiplier. It is the list
price even where a free tier will make the call free. A job without its own cap is ``sizable``:
admission may lower its output tokens to what its token and USD limits leave (``with_output``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from broker.core.config import Discount, ProviderConfig, ProviderType, Serving
from broker.core.pricing import cost_usd
from broker.core.tokens import DEFAULT_OUTPUT_TOKENS, estimate_prompt_tokens, expected_output_tokens
from broker.state.provider_stats import ModelStats
from schemas import CompletionJob

__all__ = [
    "CIRCUIT_OPEN",
    "DEFAULT_OUTPUT_TOKENS",
    "UNKNOWN_STATE",
    "Candidate",
    "Dropped",
    "ProviderState",
    "lacks",
    "make_candidate",
    "measured_error_rate",
    "measured_p50",
    "unusable",
]

CIRCUIT_OPEN = "circuit open"
"""Why an open circuit's provider was dropped (the router looks for it to say when to retry)."""


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What the scheduler knows of one provider right now (a snapshot built from Redis)."""

    status: str = "up"  # up | degraded | down
    circuit: str = "closed"  # closed | open | half_open
    open_s: float = 0.0  # while the circuit is open: seconds until a call may try again
    day_tokens_used: int = 0
    day_requests: int = 0
    error_rate: float = 0.0  # measured over all its models (``broker.state.provider_stats``)
    p50_latency_ms: float | None = None
    model_stats: Mapping[str, ModelStats] = field(default_factory=dict)  # measured, per model
    free_remaining: bool = True  # the free tier (if any) still has quota for this job
    free_resets_at: float | None = None  # when not: Unix time its full limits have all reset


UNKNOWN_STATE = ProviderState()
"""The state of a provider the scheduler has no snapshot of: healthy."""


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
    # The job set no output cap, so admission may size ``est_output_tokens`` to its limits.
    sizable: bool = False
    # The cap admission chose and reserved for; the provider is sent it (``Route.output_cap``).
    output_cap: int | None = None

    @property
    def est_tokens(self) -> int:
        return self.est_prompt_tokens + self.est_output_tokens

    def with_output(self, tokens: int) -> Candidate:
        """This candidate with ``tokens`` as its output cap, its estimated cost to match."""
        spec = self.provider.models[self.model]
        cost = cost_usd(spec, self.est_prompt_tokens, tokens, self.multiplier)
        return replace(self, est_output_tokens=tokens, est_cost_usd=cost, output_cap=tokens)

    @property
    def label(self) -> str:
        return f"{self.provider.id}/{self.model}"


@dataclass(frozen=True, slots=True)
class Dropped:
    """A (provider, model) routing did not keep, and why."""

    provider: str
    model: str
    reason: str
    lasting: bool = False
    """It will not change by waiting (the model lacks what the job needs, or serves other task
    types): a job every candidate of which is dropped so is refused, not told to retry."""

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}: {self.reason}"


def unusable(job: CompletionJob, provider: ProviderConfig, state: ProviderState) -> str | None:
    """Step 4 (health) and the provider's task types: why it cannot take the job, or None."""
    routed_by_task = job.model is None and job.task_type is not None
    if routed_by_task and provider.task_types and job.task_type not in provider.task_types:
        return f"serves task types {', '.join(provider.task_types)} only"
    if state.circuit == "open":
        return CIRCUIT_OPEN
    if state.status == "down":
        return "down"
    return None


def lacks(job: CompletionJob, candidate: Candidate) -> str | None:
    """What the job needs that the candidate's model does not take (its ``capabilities``, its
    context window), or None."""
    spec = candidate.provider.models[candidate.model]
    can = spec.capabilities
    params = job.params
    if params.stream and not can.streaming:
        return "does not stream"
    if params.tools and not can.tools:
        return "takes no tools"
    if (params.response_format or {}).get("type") in _JSON_FORMATS and not can.json_mode:
        return "has no JSON mode"
    if not can.vision and any(_has_image(m.content) for m in job.messages):
        return "takes no images"
    window = spec.context_window
    needed = candidate.est_prompt_tokens + (params.own_max_tokens or 0)
    if window is not None and needed > window:
        return f"its context window is {window} tokens; the job needs about {needed}"
    return None


_JSON_FORMATS = frozenset({"json_object", "json_schema"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def _has_image(content: object) -> bool:
    return isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") in _IMAGE_PARTS for part in content
    )


def make_candidate(
    job: CompletionJob,
    serving: Serving,
    state: ProviderState,
    now: datetime,
    zone: ZoneInfo,
    prompt_tokens: dict[ProviderType, int],
) -> Candidate:
    """``serving`` with its estimates at ``now``; ``prompt_tokens`` caches one estimate per
    tokenizer family across a job's candidates."""
    provider = serving.provider
    family = provider.type
    if family not in prompt_tokens:
        prompt_tokens[family] = estimate_prompt_tokens(job.messages, family, job.params.tools)
    prompt = prompt_tokens[family]
    spec = provider.models[serving.model]
    own = job.params.own_max_tokens
    output = expected_output_tokens(own, spec.max_tokens)
    discount = spec.discount_at(now, zone)
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
        p50_latency_ms=measured_p50(state, serving.model),
        sizable=own is None,
    )


def measured_p50(state: ProviderState, model: str) -> float | None:
    """The model's measured median latency, else its provider's over all its models."""
    stats = state.model_stats.get(model)
    return stats.p50_latency_ms if stats is not None else state.p50_latency_ms


def measured_error_rate(state: ProviderState, model: str) -> float:
    """The model's measured error rate, else its provider's over all its models."""
    stats = state.model_stats.get(model)
    return stats.error_rate if stats is not None else state.error_rate

"""Step 6 of "Routing, in order": the routing policies, which order the candidates left after
health and rules. Each breaks ties by the next criterion shown, then by config order::

    free_first   free quota left first, then estimated cost, then p50 latency
    cheapest     estimated cost (list price x the discount in force at ``now``), free first
    fastest      measured p50 latency (the model's, else its provider's); a provider with
                 nothing measured in the window first, so that it gets measured (one measured
                 slow loses its traffic; one idle for the window is tried again); one whose
                 recent calls all failed last; then cost
    weighted     a random order drawn with probability proportional to ``weight``, seeded by
                 the job id, so a redelivered job routes the same way
    round_robin  config order rotated by ``rr_counter`` (the scheduler keeps the counter)
    priority     provider ``priority`` (lower first), then free first, then cost
"""

from __future__ import annotations

import hashlib
import math

from broker.core.config import Policy
from broker.scheduler.candidates import Candidate

__all__ = ["order", "why_first"]


def order(policy: Policy, candidates: list[Candidate], job_id: str, rr: int) -> list[Candidate]:
    """The policy's order (stable, so config order breaks the remaining ties)."""
    if policy == "free_first":
        return sorted(candidates, key=lambda c: (not c.free, c.est_cost_usd, _latency(c)))
    if policy == "cheapest":
        return sorted(candidates, key=lambda c: (c.est_cost_usd, not c.free, _latency(c)))
    if policy == "fastest":
        return sorted(candidates, key=lambda c: (_unmeasured_first(c), c.est_cost_usd))
    if policy == "priority":
        return sorted(candidates, key=lambda c: (c.provider.priority, not c.free, c.est_cost_usd))
    if policy == "round_robin":
        turn = rr % len(candidates) if candidates else 0
        return candidates[turn:] + candidates[:turn]
    # weighted: Efraimidis-Spirakis keys log(u) / w, largest first, with u drawn from the job id
    # (the first place goes to each candidate with probability weight / total weight).
    return sorted(candidates, key=lambda c: -_weighted_key(job_id, c))


def why_first(policy: Policy, chosen: Candidate, ordered: list[Candidate], rr_counter: int) -> str:
    """Why the policy put ``chosen`` first among ``ordered``, in a few words for people."""
    count = len(ordered)
    if policy == "free_first":
        if chosen.free:
            return f"free tier first ({chosen.provider.id} has free quota left)"
        if any(c.provider.free_tier is not None for c in ordered):
            return f"free tier first: no free quota left, cheapest of {count}"
        return f"free tier first: none has a free tier, cheapest of {count}"
    if policy == "cheapest":
        return f"cheapest of {count}"
    if policy == "fastest":
        latency = chosen.p50_latency_ms
        if latency is None:
            return f"fastest of {count} (not measured yet)"
        if math.isinf(latency):
            return f"fastest of {count} (every one's recent calls failed)"
        return f"fastest of {count} (p50 {latency:.0f} ms)"
    if policy == "weighted":
        total = sum(c.provider.weight for c in ordered)
        return f"weighted choice of {count} (weight {chosen.provider.weight:g} of {total:g})"
    if policy == "round_robin":
        return f"round robin over {count} (turn {rr_counter})"
    return f"priority {chosen.provider.priority}, first of {count}"


def _latency(candidate: Candidate) -> tuple[bool, float]:
    latency = candidate.p50_latency_ms
    return (latency is None, latency if latency is not None else 0.0)


def _unmeasured_first(candidate: Candidate) -> tuple[bool, float]:
    latency = candidate.p50_latency_ms
    return (latency is not None, latency if latency is not None else 0.0)


def _weighted_key(job_id: str, candidate: Candidate) -> float:
    digest = hashlib.sha256(f"{job_id}\0{candidate.provider.id}\0{candidate.model}".encode())
    uniform = (int.from_bytes(digest.digest()[:8], "big") + 0.5) / 2.0**64
    return math.log(uniform) / candidate.provider.weight

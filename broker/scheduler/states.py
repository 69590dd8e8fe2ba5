"""What the scheduler knows of each provider as it routes a job: the quota a job this size
would leave (``Admission.state``), the circuit, as of a moment ago (``Circuits``), and its
measured latency and errors (``Readings.health``, a second old at most)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from broker.core.clock import utcnow
from broker.core.config import Config
from broker.core.tokens import estimate_prompt_tokens
from broker.scheduler.admission import Admission
from broker.scheduler.candidates import UNKNOWN_STATE, ProviderState
from broker.state.circuits import Circuits, CircuitState
from broker.state.provider_stats import ProviderStats
from schemas import CompletionJob

__all__ = ["provider_states"]


async def provider_states(
    job: CompletionJob,
    config: Config,
    admission: Admission | None,
    circuits: Circuits | None,
    health: Mapping[str, ProviderStats],
) -> dict[str, ProviderState]:
    if admission is None and circuits is None and not health:
        return {}
    tokens, now = 0, None
    if admission is not None:
        tokens = estimate_prompt_tokens(job.messages) + (job.params.own_max_tokens or 0)
        now = utcnow()
    states = {}
    for provider in config.providers:
        state = UNKNOWN_STATE
        if admission is not None and now is not None:
            state = await admission.state(provider, tokens, now)
        if circuits is not None:
            view = circuits.fresh(provider.id) or await circuits.view(provider.id)
            circuit = view.state(provider.circuit.failures)
            if circuit is not CircuitState.CLOSED:
                state = replace(state, circuit=circuit.value, open_s=view.open_s_left())
        stats = health.get(provider.id)
        if stats is not None:
            state = replace(
                state,
                status=stats.overall.status,
                error_rate=stats.overall.error_rate,
                p50_latency_ms=stats.overall.p50_latency_ms,
                model_stats=stats.models,
            )
        states[provider.id] = state
    return states

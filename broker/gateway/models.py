"""``GET /v1/models``: OpenAI's list of models, each extended (``switchyard``) with what a
router's user needs: the providers behind it, their prices now (any discount window in force),
limits, and each provider's circuit state as the breakers see it."""

from __future__ import annotations

from typing import Any

from broker.core.clock import utcnow
from broker.core.config import Config, Serving
from broker.core.limits import KeyConfig
from broker.state.circuits import Circuits

__all__ = ["model_entry", "models_list"]


async def models_list(
    config: Config, circuits: Circuits | None, key: KeyConfig | None = None
) -> dict[str, Any]:
    """Every public model, or those ``key``'s scopes allow."""
    names = [n for n in config.public_models() if key is None or key.allows(n)]
    entries = [await model_entry(config, name, circuits) for name in names]
    return {"object": "list", "data": entries}


async def model_entry(
    config: Config, public_model: str, circuits: Circuits | None
) -> dict[str, Any]:
    providers = [await _provider(config, s, circuits) for s in config.serving([public_model])]
    return {
        "id": public_model,
        "object": "model",
        "created": 0,
        "owned_by": "switchyard",
        "switchyard": {"providers": providers},
    }


async def _provider(config: Config, serving: Serving, circuits: Circuits | None) -> dict[str, Any]:
    provider, spec = serving.provider, serving.provider.models[serving.model]
    discount = spec.discount_at(utcnow(), config.zone)
    multiplier = discount.multiplier if discount is not None else 1
    circuit: str | None = None
    if circuits is not None:
        view = await circuits.view(provider.id)  # Redis away: the last state seen, or closed
        circuit = view.state(provider.circuit.failures).value
    return {
        "provider": provider.id,
        "type": provider.type.value,
        "model": serving.model,
        "price_per_million": {"input": str(spec.input), "output": str(spec.output)},
        "price_now_per_million": {
            "input": str(spec.input * multiplier),
            "output": str(spec.output * multiplier),
        },
        "discount": discount.model_dump(mode="json") if discount is not None else None,
        "max_tokens": spec.max_tokens,
        "context_window": spec.context_window,
        "capabilities": spec.capabilities.model_dump(),
        "limits": {
            "concurrency": provider.concurrency,
            "global_concurrency": provider.global_concurrency,
            "provider_rpm": provider.rpm,
            "provider_tpm": provider.tpm,
            "model_rpm": spec.rpm,
            "model_tpm": spec.tpm,
        },
        "circuit": circuit,
    }

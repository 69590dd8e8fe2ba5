"""The checks across the parts of a config that field types cannot make: ids are unique, every
name one part gives another exists, and every rule compiles, so a config that loads can serve."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core.errors import ConfigError

if TYPE_CHECKING:
    from broker.core.config import Config

__all__ = ["check_references"]


def check_references(config: Config) -> None:
    """The first broken reference as a ``ValueError`` (pydantic reports it with the file)."""
    _check_models(config)
    _check_routes(config)
    _check_keys(config)
    _check_rules(config)
    _check_alerts(config)


def _check_models(config: Config) -> None:
    ids = [p.id for p in config.providers]
    if len(ids) != len(set(ids)):
        raise ValueError(f"provider ids must be unique, got {ids}")
    for name, targets in config.models.items():
        if not targets:
            raise ValueError(f"models.{name}: needs at least one provider")
        for target in targets:
            provider = config.provider(target.provider)
            if provider is None:
                raise ValueError(f"models.{name}: unknown provider {target.provider!r}")
            upstream = target.model or name
            if upstream not in provider.models:
                raise ValueError(
                    f"models.{name}: provider {provider.id!r} has no model {upstream!r}"
                )
    if config.default_model is not None and config.default_model not in config.public_models():
        raise ValueError(f"default_model {config.default_model!r} is not a known model")


def _check_routes(config: Config) -> None:
    public = config.public_models()
    for task_type, route in config.routes.items():
        for model in route.models:
            if model not in public:
                raise ValueError(
                    f"routes.{task_type}.models: unknown model {model!r};"
                    f" available: {', '.join(public)}"
                )


def _check_keys(config: Config) -> None:
    public = config.public_models()
    key_ids: dict[str, int] = {}
    digests: dict[str, int] = {}
    for index, key in enumerate(config.keys):
        where = f"keys.{index} ({key.id})"
        if key.id in key_ids:
            raise ValueError(f"{where}: duplicate id (see keys.{key_ids[key.id]})")
        if key.key_sha256 in digests:
            raise ValueError(f"{where}: same key_sha256 as keys.{digests[key.key_sha256]}")
        key_ids[key.id] = digests[key.key_sha256] = index
        if config.consumers and key.consumer is not None and key.consumer not in config.consumers:
            raise ValueError(
                f"{where}.consumer: unknown consumer {key.consumer!r};"
                f" known: {', '.join(config.consumers)}"
            )
        unknown = key.unknown_scopes(public)
        if unknown:
            raise ValueError(
                f"{where}.scopes: not a known model: {', '.join(map(repr, unknown))}"
                " (use a pattern like 'claude-*' for families)"
            )


def _check_rules(config: Config) -> None:
    known = {p.id for p in config.providers}
    for index, rule in enumerate(config.rules):
        for provider_id in rule.providers or []:
            if provider_id not in known:
                raise ValueError(
                    f"rules.{index} ({rule.name}).providers: unknown provider {provider_id!r}"
                )
    try:
        _ = config.compiled_rules  # compiled here, once, and cached: a broken rule refuses
    except ConfigError as exc:
        raise ValueError(exc.message) from None


def _check_alerts(config: Config) -> None:
    """An alerts webhook nothing could sign would end every alert dead, unseen."""
    hook = config.alerts.webhook
    if hook is not None and not config.webhooks.secrets_for(str(hook)):
        raise ValueError(
            "alerts.webhook: no webhooks.secret (or endpoint secret) to sign its alerts with"
        )

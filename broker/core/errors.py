"""Switchyard's one error tree. Each leaf maps to one ``ErrorCode`` in a ``JobResult`` and one
HTTP status::

    SwitchyardError
    ├── ConfigError                    (a config file or setting is invalid; never reaches a job)
    ├── Unavailable                    unavailable       503  (RabbitMQ or Redis unreachable now;
    │                                                          retryable, carries retry_after)
    ├── Cancelled                      cancelled         409  (status "cancelled": its caller
    │                                                          cancelled it before its call)
    ├── JobRejected                    status "rejected": the job itself is wrong
    │   ├── InvalidMessage             invalid_message            400
    │   ├── UnsupportedSchemaVersion   unsupported_schema_version 400
    │   ├── Unauthorized               unauthorized               401
    │   ├── Forbidden                  forbidden                  403 (the model is outside the
    │   │                                                              key's scopes)
    │   ├── QuotaExceeded              rate_limited               429 (carries retry_after)
    │   ├── ModelUnavailable           model_unavailable          404 (no such model or route)
    │   │   ├── NoProviderAvailable    no_provider_available      503 (every candidate dropped,
    │   │   │                                                          each named with its reason;
    │   │   │                                                          retry_after if circuits)
    │   │   └── NoCapableModel         no_capable_model           400 (every candidate lacks what
    │   │                                                              the job needs: waiting will
    │   │                                                              not help)
    │   └── DeadlineExceeded           deadline_exceeded          504 (status "expired")
    └── ProviderError                  status "failed": the provider call did not succeed
        ├── RateLimited                rate_limited      429  (retryable, carries retry_after)
        │   └── QuotaExhausted         rate_limited      429  (not retryable: the account's credit)
        ├── ProviderTimeout            timeout           504  (retryable)
        ├── ProviderServerError        server_error      502  (retryable)
        ├── ProviderUnavailable        provider_unavailable 503 (its circuit is open; not called)
        ├── ProviderInvalidRequest     invalid_request   400
        ├── ProviderAuthentication     authentication    502  (our credentials, not the caller's)
        ├── ContentFiltered            content_filter    422
        └── ProviderProtocolError      provider_protocol_error 502 (not the documented shape)
"""

from __future__ import annotations

from typing import Any

from schemas import ErrorCode, JobError

__all__ = [
    "Cancelled",
    "ConfigError",
    "ContentFiltered",
    "DeadlineExceeded",
    "Forbidden",
    "InvalidMessage",
    "JobRejected",
    "ModelUnavailable",
    "NoCapableModel",
    "NoProviderAvailable",
    "ProviderAuthentication",
    "ProviderError",
    "ProviderInvalidRequest",
    "ProviderProtocolError",
    "ProviderServerError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "QuotaExceeded",
    "QuotaExhausted",
    "RateLimited",
    "SwitchyardError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedSchemaVersion",
    "internal_error",
    "status_of",
]


class SwitchyardError(Exception):
    """Root of every error Switchyard raises on purpose. A subclass names what it changes in its
    class line (``code=``, ``http_status=``, ...), so each error's wire mapping is one line."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    family: str = "internal"
    http_status: int = 500
    retryable: bool = False

    def __init_subclass__(
        cls,
        *,
        code: ErrorCode | None = None,
        family: str | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        given = {"code": code, "family": family, "http_status": http_status, "retryable": retryable}
        for name, value in given.items():
            if value is not None:
                setattr(cls, name, value)

    def __init__(
        self, message: str, *, provider: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.retry_after = retry_after  # seconds after which trying again may succeed

    def to_job_error(self) -> JobError:
        return JobError(
            type=self.family,
            code=self.code,
            message=self.message,
            retry_after=self.retry_after,
            provider=self.provider,
        )


def internal_error(exc: BaseException) -> JobError:
    """A typed error for a bug: names the exception class, never its (possibly secret) text."""
    return JobError(
        type="internal",
        code=ErrorCode.INTERNAL_ERROR,
        message=f"internal error ({type(exc).__name__})",
    )


class ConfigError(SwitchyardError):
    """The config file or the environment is invalid; the message names the path and reason."""


class Unavailable(
    SwitchyardError,
    code=ErrorCode.UNAVAILABLE,
    family="unavailable",
    http_status=503,
    retryable=True,
):
    """A server Switchyard needs is unreachable now; trying again after ``retry_after`` may
    succeed. Whether the job ran is said in the message (a call cut off may have)."""


class Cancelled(SwitchyardError, code=ErrorCode.CANCELLED, family="cancelled", http_status=409): ...


class JobRejected(SwitchyardError, family="invalid_request", http_status=400): ...


class InvalidMessage(JobRejected, code=ErrorCode.INVALID_MESSAGE): ...


class UnsupportedSchemaVersion(JobRejected, code=ErrorCode.UNSUPPORTED_SCHEMA_VERSION): ...


class Unauthorized(JobRejected, code=ErrorCode.UNAUTHORIZED, http_status=401): ...


class Forbidden(JobRejected, code=ErrorCode.FORBIDDEN, http_status=403): ...


class QuotaExceeded(JobRejected, code=ErrorCode.RATE_LIMITED, http_status=429):
    """No candidate's limits or budgets can take the job now."""


class ModelUnavailable(JobRejected, code=ErrorCode.MODEL_UNAVAILABLE, http_status=404): ...


class NoProviderAvailable(
    ModelUnavailable, code=ErrorCode.NO_PROVIDER_AVAILABLE, http_status=503
): ...


class NoCapableModel(ModelUnavailable, code=ErrorCode.NO_CAPABLE_MODEL, http_status=400): ...


class DeadlineExceeded(JobRejected, code=ErrorCode.DEADLINE_EXCEEDED, http_status=504): ...


class ProviderError(SwitchyardError, family="provider_error", http_status=502): ...


class RateLimited(ProviderError, code=ErrorCode.RATE_LIMITED, http_status=429, retryable=True): ...


class QuotaExhausted(RateLimited, retryable=False):
    """The provider account's credit or spend limit is used up (OpenAI's 429
    ``insufficient_quota``): a 429, but no retry helps until its billing changes."""


class ProviderTimeout(ProviderError, code=ErrorCode.TIMEOUT, http_status=504, retryable=True): ...


class ProviderServerError(ProviderError, code=ErrorCode.SERVER_ERROR, retryable=True): ...


class ProviderUnavailable(ProviderError, code=ErrorCode.PROVIDER_UNAVAILABLE, http_status=503):
    """The provider's circuit breaker is open (``broker.state.circuits``): the job was not sent
    to it. ``retry_after`` is when the circuit lets a call try again."""


class ProviderInvalidRequest(ProviderError, code=ErrorCode.INVALID_REQUEST, http_status=400): ...


class ProviderAuthentication(ProviderError, code=ErrorCode.AUTHENTICATION): ...


class ContentFiltered(ProviderError, code=ErrorCode.CONTENT_FILTER, http_status=422): ...


class ProviderProtocolError(ProviderError, code=ErrorCode.PROVIDER_PROTOCOL_ERROR): ...


def _leaves(cls: type[SwitchyardError]) -> list[type[SwitchyardError]]:
    return [leaf for sub in cls.__subclasses__() for leaf in (sub, *_leaves(sub))]


_STATUS = {cls.code: cls.http_status for cls in _leaves(SwitchyardError) if "code" in vars(cls)}


def status_of(error: JobError) -> int:
    """The HTTP status of a job's error, as the tree above maps its code (500 for a bug)."""
    return _STATUS.get(error.code, 500)

"""Errors in OpenAI's error object, with the status the one error tree gives each code
(``broker.core.errors.status_of``): the official SDKs raise their own class for each status."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.responses import Response

from broker.core.errors import status_of
from schemas import ErrorCode, JobError

__all__ = ["GatewayError", "error_response", "job_error_response", "openai_error"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """A request refused at the door (it never reaches the queue)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = ErrorCode.INVALID_MESSAGE.value,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after


def openai_error(
    status: int, message: str, code: str, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """OpenAI's error object; ``extra`` adds Switchyard's own fields (``provider``, ...)."""
    body = {
        "message": message,
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return {"error": body}


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    param: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    all_headers = dict(headers or {})
    if retry_after is not None:
        # Retry-After takes whole seconds: never tell a client to come back sooner than asked.
        all_headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    body = openai_error(status, message, code, param, retry_after=retry_after, **extra)
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=all_headers
    )


def job_error_response(error: JobError, headers: dict[str, str] | None = None) -> Response:
    """A job's typed error (the same the AMQP result carries) as an HTTP answer."""
    return error_response(
        status_of(error),
        error.message,
        error.code.value,
        retry_after=error.retry_after,
        headers=headers,
        provider=error.provider,
    )

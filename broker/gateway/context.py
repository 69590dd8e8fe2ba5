"""What a route finds on its request: the gateway serving it (the app's state) and the
caller's bearer token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from broker.gateway.errors import GatewayError
from schemas import ErrorCode

if TYPE_CHECKING:
    from broker.gateway.service import Gateway

__all__ = ["bearer", "gateway_of"]


def gateway_of(request: Request) -> Gateway:
    """The gateway serving this request (``make_app`` puts it on the app)."""
    gateway: Gateway = request.app.state.gateway
    return gateway


def bearer(request: Request) -> str | None:
    """The ``Authorization: Bearer`` token, if any; another scheme is refused (401)."""
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GatewayError(
            401,
            "the Authorization header must be 'Bearer <virtual key>'",
            code=ErrorCode.UNAUTHORIZED.value,
        )
    return token.strip()

"""Lua the Redis scripts of ``broker.state`` share: one clock, Redis's own, so no expiry or
open-until depends on which host's clock looked."""

from __future__ import annotations

__all__ = ["NOW_MS"]

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
"""Sets ``now`` to Redis's clock in whole milliseconds."""

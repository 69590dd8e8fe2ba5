"""The base of every model read from the providers file: an unknown field is an error, so a typo
never passes silently, and a loaded config never changes under the code that holds it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A config model: unknown fields refused, instances frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

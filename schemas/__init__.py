"""Wire contracts shared by every Switchyard process: small pydantic models, no behaviour."""

from schemas import chat, jobs
from schemas.chat import *  # noqa: F403 (each module's __all__ is the contract)
from schemas.jobs import *  # noqa: F403

__all__ = [*chat.__all__, *jobs.__all__]

"""Wire contracts shared by every Switchyard process: small pydantic models, no behaviour."""

from schemas import accounting, chat, control, jobs, webhooks
from schemas.accounting import *  # noqa: F403 (each module's __all__ is the contract)
from schemas.chat import *  # noqa: F403
from schemas.control import *  # noqa: F403
from schemas.jobs import *  # noqa: F403
from schemas.webhooks import *  # noqa: F403

__all__ = [*accounting.__all__, *chat.__all__, *control.__all__, *jobs.__all__, *webhooks.__all__]

"""Each queue's depth, consumers and oldest message, from RabbitMQ's management API (the
``rabbitmq_management`` plugin, which the project's scripts enable): AMQP itself tells a queue's
depth but not the age of its head, which RabbitMQ reads from the message's ``timestamp``
property (``Publisher.publish`` sets it on every message)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httpx

__all__ = ["QueueLevel", "management_url", "queue_levels", "vhost_of"]

API_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class QueueLevel:
    name: str
    ready: int
    consumers: int
    oldest_age_s: float  # 0 when empty or the head carries no timestamp


def management_url(amqp_url: str) -> str:
    """The management API beside an AMQP URL: its host and credentials, port 15672 (15671 and
    HTTPS beside ``amqps``, so the credentials never go in the clear where AMQP's do not)."""
    parts = urlsplit(amqp_url)
    user = parts.username or "guest"
    password = parts.password or "guest"
    host = parts.hostname or "127.0.0.1"
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}"


def vhost_of(amqp_url: str) -> str:
    """The AMQP URL's virtual host ("/" when it names none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def queue_levels(
    client: httpx.AsyncClient, api_url: str, vhost: str, prefix: str
) -> list[QueueLevel]:
    """The queues of ``vhost`` whose names start with ``prefix``."""
    parts = urlsplit(api_url)
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    default_port = 15671 if parts.scheme == "https" else 15672
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or default_port}"
    response = await client.get(
        f"{base}/api/queues/{quote(vhost, safe='')}",
        params={"columns": "name,messages_ready,consumers,head_message_timestamp"},
        auth=auth,
        timeout=API_TIMEOUT_S,
    )
    response.raise_for_status()
    now = time.time()
    levels = []
    for queue in response.json():
        name = queue.get("name", "")
        if not name.startswith(prefix):
            continue
        ready = int(queue.get("messages_ready") or 0)
        head = queue.get("head_message_timestamp")
        age = max(now - float(head), 0.0) if ready and isinstance(head, int | float) else 0.0
        levels.append(QueueLevel(name, ready, int(queue.get("consumers") or 0), age))
    return levels

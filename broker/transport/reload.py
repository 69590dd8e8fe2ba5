"""Hot reload: each process watches the config file and listens on ``<ns>.config``.

A file change that parses to a new digest is applied here (each subscribed service's ``apply``),
recorded in ``config_versions`` (when the process has a database) and published on the exchange;
a version heard on the exchange is validated again and applied. An invalid file or message is
logged with its path and reason and changes nothing. Several processes seeing one change is
harmless: recording is an upsert by digest, and a digest already running is not applied again.

The watcher reacts to the file *changing*, not to its differing from what runs, so a version
that came on the bus is not undone by this host's unchanged file (``switchyard config rollback``
writes the file and publishes, so both agree).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.config import Config, parse_config
from broker.core.errors import ConfigError
from broker.core.names import Names
from broker.transport.amqp import Publisher, declare_config_exchange
from broker.transport.runtime import ConsumerSet, Service, connect_server

if TYPE_CHECKING:
    # Imported when recording: processes without a database never load SQLAlchemy.
    from sqlalchemy.ext.asyncio import AsyncEngine

    from broker.core.config_store import Source

__all__ = [
    "Apply",
    "ConfigReloader",
    "Reloadable",
    "VersionMessage",
    "announce",
    "read_config_text",
]

log = logging.getLogger(__name__)

POLL_S = 0.25
RECORD_TIMEOUT_S = 5.0
SETTLE_S = 0.05
"""A file read while its writer truncated and rewrote it parses as garbage: look once more."""

Apply = Callable[[Config], Awaitable[None]]


class Reloadable(Protocol):
    """A service that takes a new config version without restarting."""

    async def apply(self, config: Config) -> None: ...


@dataclass(frozen=True, slots=True)
class VersionMessage:
    """What ``<ns>.config`` carries: the digest, the text as applied, and how it came in."""

    digest: str
    content: str
    source: Source

    def encode(self) -> bytes:
        return orjson.dumps({"digest": self.digest, "content": self.content, "source": self.source})

    @classmethod
    def decode(cls, body: bytes) -> VersionMessage:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("digest", "content", "source")
        ):
            raise ConfigError("needs the string fields digest, content and source")
        sources: dict[str, Source] = {"file": "file", "rollback": "rollback"}
        return cls(data["digest"], data["content"], sources.get(data["source"], "bus"))


async def announce(amqp_url: str, names: Names, message: VersionMessage) -> None:
    """Publish one version from a short-lived connection (``switchyard config rollback``)."""
    connection = await connect_server(amqp_url, name="switchyard-config")
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_config_exchange(channel, names)
        await Publisher(channel, exchange).publish(
            "", message.encode(), message_id=message.digest, mandatory=False
        )
    finally:
        await connection.close()


class _Seen(NamedTuple):
    mtime_ns: int
    size: int
    sha256: str


def read_config_text(path: Path) -> str:
    """The text exactly (no newline translation), so a rollback writes back the same bytes."""
    try:
        return path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def _read(path: Path) -> tuple[_Seen, str]:
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    text = read_config_text(path)
    return _Seen(stat.st_mtime_ns, stat.st_size, hashlib.sha256(text.encode()).hexdigest()), text


class ConfigReloader(Service):
    """Watches the config file and the config exchange; applies each new valid version to the
    subscribed services of this process."""

    name = "config-reloader"

    def __init__(
        self,
        path: Path,
        amqp_url: str,
        names: Names,
        config: Config,
        *,
        database_url: str | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.path = path
        self.amqp_url = amqp_url
        self.names = names
        self.database_url = database_url
        self.poll_s = poll_s
        self.consumers = ConsumerSet()
        self._config = config
        self._digest = config.version  # hashing the whole config each time is not free
        self._subscribers: list[Apply] = []
        self._seen: _Seen | None = None
        self._unreadable: str | None = None
        self._lock = asyncio.Lock()
        self._tag = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._engine: AsyncEngine | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def config(self) -> Config:
        """The version running in this process."""
        return self._config

    @property
    def digest(self) -> str:
        """The running version's digest (``Config.version``)."""
        return self._digest

    def subscribe(self, apply: Apply) -> None:
        """Call ``apply(config)`` with each new version (in subscription order)."""
        self._subscribers.append(apply)

    async def start(self) -> None:
        if self.database_url is not None:
            from broker.core.db import make_engine

            self._engine = make_engine(self.database_url)
        self._connection = await connect_server(self.amqp_url, name=f"switchyard-{self.name}")
        channel = await self._connection.channel(publisher_confirms=True)
        exchange = await declare_config_exchange(channel, self.names)
        self._publisher = Publisher(channel, exchange)
        # A named queue (not server-named): a robust channel redeclares it after a reconnect.
        queue = await channel.declare_queue(
            self.names.config_listener(self._tag), exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await self._check_file(initial=True)
        await self.consumers.consume(queue, self._on_message)
        self._poller = asyncio.create_task(self._poll())

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._poller is not None:
            # A version being applied is recorded (and published) before the watcher stops, so
            # no applied version is missing from config_versions.
            held = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lock.acquire(), grace_s)
                held = True
            self._poller.cancel()
            await asyncio.wait([self._poller])  # its end; the caller's own cancel still raises
            if held:
                self._lock.release()
        await self.consumers.stop(grace_s)
        if self._connection is not None:
            await self._connection.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self._check_file()
            except Exception:
                log.exception("checking %s failed", self.path)

    async def _check_file(self, *, initial: bool = False) -> None:
        try:
            seen, text = _read(self.path)
        except ConfigError as exc:
            if self._unreadable != exc.message:
                self._unreadable = exc.message
                log.error("%s; keeping config version %s", exc.message, self._digest)
            return
        self._unreadable = None
        if seen == self._seen:
            return
        changed = self._seen is None or seen.sha256 != self._seen.sha256
        self._seen = seen
        if not changed:
            return  # touched, same text
        try:
            config = parse_config(text, str(self.path))
        except ConfigError as exc:
            await asyncio.sleep(SETTLE_S)
            with contextlib.suppress(ConfigError):
                if _read(self.path)[0].sha256 != seen.sha256:
                    return  # caught mid-write: the next poll reads the finished file
            log.error("%s\nkeeping config version %s", exc.message, self._digest)
            return
        if initial and config.version == self._digest:
            await self._record(text, config, "file")  # the version this process started on
            return
        await self._offer(config, text, "file", publish=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            version = VersionMessage.decode(message.body)
            if version.digest == self._digest:
                await message.ack()
                return
            config = parse_config(
                version.content, f"{self.names.config} ({version.source} {version.digest})"
            )
        except ConfigError as exc:
            log.error(
                "refused a config version from %s: %s\nkeeping config version %s",
                self.names.config,
                exc.message,
                self._digest,
            )
            await message.ack()
            return
        await self._offer(config, version.content, "bus", publish=False)
        await message.ack()

    async def _offer(self, config: Config, text: str, source: Source, *, publish: bool) -> None:
        """Apply a valid version here unless it already runs, then record and publish it."""
        digest = config.version
        async with self._lock:
            previous = self._digest
            if digest == previous:
                return
            for apply in self._subscribers:
                try:
                    await apply(config)
                except Exception:
                    log.exception("applying config version %s failed in %r", digest, apply)
            self._config, self._digest = config, digest
            log.info(
                "config version %s applied (was %s; from the %s)",
                digest,
                previous,
                "file" if source == "file" else "config exchange",
            )
            await self._record(text, config, source)
            if publish:
                await self._publish(VersionMessage(digest, text, source))

    async def _record(self, text: str, config: Config, source: Source) -> None:
        if self._engine is None:
            return
        from broker.core.config_store import record

        try:
            await asyncio.wait_for(record(self._engine, text, config, source), RECORD_TIMEOUT_S)
        except Exception as exc:
            log.warning("config version %s not recorded in Postgres: %r", config.version, exc)

    async def _publish(self, message: VersionMessage) -> None:
        assert self._publisher is not None
        try:
            await self._publisher.publish(
                "", message.encode(), message_id=message.digest, mandatory=False
            )
        except Exception as exc:
            log.warning("config version %s not published: %r", message.digest, exc)

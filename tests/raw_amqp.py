"""A bare AMQP 0-9-1 producer over pamqp's frames, for messages aio-pika and aiormq cannot send:
aiormq gives every publish a ``message_id``, where producers in other languages often set none."""

from __future__ import annotations

import asyncio
from typing import Any

from pamqp import commands, frame, header
from pamqp.body import ContentBody


class _Frames:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""

    async def next(self) -> Any:
        while True:
            try:
                used, _, value = frame.unmarshal(self.buffer)
            except Exception:  # incomplete: read more (bounded by the caller's timeout)
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("the broker closed the connection") from None
                self.buffer += chunk
                continue
            self.buffer = self.buffer[used:]
            return value


async def publish_raw(
    host: str, port: int, routing_key: str, body: bytes, properties: commands.Basic.Properties
) -> None:
    """Publish one message to the default exchange as guest, with exactly ``properties``."""
    reader, writer = await asyncio.open_connection(host, port)
    frames = _Frames(reader)

    async def expect(kind: type) -> Any:
        value = await asyncio.wait_for(frames.next(), 10)
        assert isinstance(value, kind), value
        return value

    def send(channel: int, *values: Any) -> None:
        for value in values:
            writer.write(frame.marshal(value, channel))

    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await expect(commands.Connection.Start)
        send(0, commands.Connection.StartOk(response="\0guest\0guest", mechanism="PLAIN"))
        tune = await expect(commands.Connection.Tune)
        send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        send(0, commands.Connection.Open(virtual_host="/"))
        await expect(commands.Connection.OpenOk)
        send(1, commands.Channel.Open())
        await expect(commands.Channel.OpenOk)
        send(
            1,
            commands.Basic.Publish(exchange="", routing_key=routing_key),
            header.ContentHeader(0, len(body), properties),
            ContentBody(body),
        )
        send(0, commands.Connection.Close(200, "done", 0, 0))
        await expect(commands.Connection.CloseOk)
    finally:
        writer.close()

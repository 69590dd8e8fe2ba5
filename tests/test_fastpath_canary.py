"""The AMQP fast path is a plug-in: a producer's import installs none of it, and once installed its
classes are the ones a live connection really uses, and every frame that connection writes is
pamqp's own bytes. Fails when a release of aio-pika, aiormq or pamqp no longer takes the patches."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pamqp.frame
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.core.names import Names
from broker.transport import fastpath
from broker.transport.amqp import Publisher, connect
from broker.transport.fastpath import frames
from broker.transport.fastpath.connection import (
    CoalescingWriter,
    FastConnection,
    FastFrameReceiver,
    LeanDelivery,
)
from tests.conftest import REPO, delete_queues

_STATE = """
import json, sys
import aiormq.connection, pamqp.frame
{setup}
from broker.transport import amqp
print(json.dumps({{
    "receiver": aiormq.connection.FrameReceiver.__module__,
    "marshal": pamqp.frame.marshal.__module__,
    "frame_buffer": aiormq.Connection.FRAME_BUFFER_SIZE,
    "connection": amqp._connection_class.__module__,
    "fastpath_imported": "broker.transport.fastpath" in sys.modules,
}}))
"""


def _state_after(setup: str) -> dict[str, Any]:
    code = _STATE.format(setup=setup)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    state: dict[str, Any] = json.loads(done.stdout)
    return state


def test_importing_the_client_installs_no_patch_and_install_does() -> None:
    plain = _state_after("import broker.client")
    assert plain.pop("frame_buffer") < fastpath.WRITE_QUEUE_FRAMES  # aiormq's own default
    assert plain == {
        "receiver": "aiormq.connection",
        "marshal": "pamqp.frame",
        "connection": "aio_pika.robust_connection",
        "fastpath_imported": False,
    }
    # The control: a producer that turns the fast path on gets every part of it.
    fast = _state_after(
        "import broker.client\nfrom broker.transport import fastpath\nfastpath.install()"
    )
    assert fast == {
        "receiver": "broker.transport.fastpath.connection",
        "marshal": "broker.transport.fastpath.frames",
        "frame_buffer": fastpath.WRITE_QUEUE_FRAMES,
        "connection": "broker.transport.fastpath.connection",
        "fastpath_imported": True,
    }


async def test_a_live_connection_uses_every_patched_class_and_writes_pamqps_bytes(
    amqp: AbstractRobustConnection, names: Names, monkeypatch: pytest.MonkeyPatch, fast_path: None
) -> None:
    assert fastpath.installed()
    written: list[tuple[Any, int, bytes]] = []
    received: list[int] = []
    flushes: list[int] = []

    def recording_marshal(value: Any, channel_id: int) -> bytes:
        wire = frames.marshal(value, channel_id)
        written.append((value, channel_id, wire))
        return wire

    get_frame = FastFrameReceiver.get_frame

    async def counting_get_frame(self: FastFrameReceiver) -> Any:
        received.append(1)
        return await get_frame(self)

    flush = CoalescingWriter._flush

    def counting_flush(self: CoalescingWriter) -> None:
        flushes.append(len(self._pending))
        flush(self)

    # aiormq must look each of these up where the fast path put them, at the time of the call.
    monkeypatch.setattr(pamqp.frame, "marshal", recording_marshal)
    monkeypatch.setattr(FastFrameReceiver, "get_frame", counting_get_frame)
    monkeypatch.setattr(CoalescingWriter, "_flush", counting_flush)

    queue_name = names.results("canary")
    connection = await connect(str(amqp.url), name="test-canary")
    try:
        assert type(connection) is FastConnection
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def handler(message: AbstractIncomingMessage) -> None:
            await got.put(message)
            await message.ack()

        await queue.consume(handler)
        await Publisher(channel).publish(
            queue_name, b'{"canary": 1}', message_id="m-1", priority=3, headers={"x-h": "v"}
        )
        message = await asyncio.wait_for(got.get(), 10)
        assert type(message) is LeanDelivery
        assert (message.body, message.message_id, message.priority) == (b'{"canary": 1}', "m-1", 3)
        assert message.headers == {"x-h": "v"}
    finally:
        await delete_queues(amqp, queue_name)
        await connection.close()

    assert received and flushes, "the fast receiver and writer were not used"
    kinds = {type(value).__name__ for value, _, _ in written}
    assert {"Publish", "ContentHeader", "ContentBody", "Ack"} <= kinds, kinds
    for value, channel_id, wire in written:
        assert wire == frames._PAMQP_MARSHAL(value, channel_id), value
        _, _, decoded = frames.unmarshal(wire)
        assert frames._PAMQP_MARSHAL(decoded, channel_id) == wire, value

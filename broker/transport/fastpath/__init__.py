"""The AMQP fast path: aiormq and pamqp made cheaper per frame, as one opt-in plug-in.

``install()`` changes, for the whole process (aiormq reads them by module name, so nothing
narrower exists):

- ``aiormq.connection.FrameReceiver``: cuts frames from whatever has arrived (``connection``);
- ``pamqp.frame.marshal``: straight-line encoding of the frames every hop carries (``frames``);
- ``aiormq.Connection.FRAME_BUFFER_SIZE``: raised, so a burst of publishes shares a send;
- the connection class of ``broker.transport.amqp.connect``: a coalescing writer, and queues
  that hand deliveries over as lean messages in aiormq's own task.

Server processes install it unless ``SWITCHYARD_AMQP_FAST_PATH`` is off; a producer's client does
not unless the producer calls ``install()``. aio-pika, aiormq and pamqp are pinned to the range the
canary test (``tests/test_fastpath_canary.py``) passed on. Gains: docs/architecture.md.
"""

from __future__ import annotations

import aiormq
import pamqp.frame

from broker.transport import amqp
from broker.transport.fastpath import frames
from broker.transport.fastpath.connection import FastConnection, FastFrameReceiver

__all__ = ["WRITE_QUEUE_FRAMES", "install", "installed"]

WRITE_QUEUE_FRAMES = 1024
"""aiormq's bound on frames queued for its writer (10 by default). With 10, a handler whose
publish finds the queue full waits holding its channel's lock, and a burst's publishes cannot
share a send. What is queued stays bounded by each consumer's prefetch and the confirms awaited."""

_installed = False


def install() -> None:
    """Put the fast path in place for every AMQP connection this process makes from now on."""
    global _installed
    if _installed:
        return
    aiormq.Connection.FRAME_BUFFER_SIZE = max(
        aiormq.Connection.FRAME_BUFFER_SIZE, WRITE_QUEUE_FRAMES
    )
    aiormq.connection.FrameReceiver = FastFrameReceiver  # type: ignore[misc]
    pamqp.frame.marshal = frames.marshal
    amqp.use_connection_class(FastConnection)
    _installed = True


def installed() -> bool:
    return _installed

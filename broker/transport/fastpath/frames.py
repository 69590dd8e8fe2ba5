"""The AMQP frames every hop of a job carries, encoded and decoded without pamqp's reflection.

A publish is a Basic.Publish, a content header and a body; a delivery is a Basic.Deliver, a content
header and a body; the broker confirms with Basic.Ack and consumers ack with it. pamqp encodes and
decodes each frame field by field through a lookup of the field's type by name and a dispatch on
that type, on every hop of every job. These functions do the same work in straight-line code, for
those frames only, and produce and take pamqp's own objects, so aiormq sees no difference (gains:
docs/architecture.md). The layout (field order, property flags and types) is read from pamqp's
classes once; tables and timestamps still go through pamqp's codecs.

Every other frame, and any of these that does not fit the fast path (an unexpected type, a
continued flag word, a string too long), goes through pamqp, which then decodes it or raises its
own error: what is decoded or refused is decided by pamqp alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from pamqp import commands, constants, decode, encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

__all__ = ["marshal", "unmarshal"]

_FRAME = struct.Struct(">BHI")
_HEADER = struct.Struct(">HHQH")  # class id, weight, body size, the first flag word
_INDEX = struct.Struct(">I")
_PUBLISH = struct.Struct(">Ih")  # method index, the reserved ticket
_LONGLONG = struct.Struct(">q")
_FRAME_END = bytes([constants.FRAME_END])
_HEADER_PREFIX = struct.Struct(">HxxQH")  # class id, weight (always 0), body size, flags
_ACK_ARGUMENTS = struct.Struct(">qB")
_ACK_FRAME = struct.Struct(">IqB")

_DELIVER = commands.Basic.Deliver.index
_ACK = commands.Basic.Ack.index
_PROPERTIES: list[tuple[str, int, str]] = [
    (name, commands.Basic.Properties.flags[name], getattr(commands.Basic.Properties, f"_{name}"))
    for name in commands.Basic.Properties.__slots__
]
_DECODERS: dict[str, Callable[[bytes], tuple[int, Any]]] = {
    "table": decode.field_table,
    "timestamp": decode.timestamp,
}
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "table": encode.field_table,
    "timestamp": encode.timestamp,
}
_PAMQP_MARSHAL = pamqp.frame.marshal


class _NotFast(Exception):
    """The frame is left to pamqp."""


def unmarshal(data: bytes) -> tuple[int, int, pamqp.frame.FrameTypes]:
    """``pamqp.frame.unmarshal`` of one whole frame (``data`` ends with its end byte)."""
    try:
        frame_type, channel, size = _FRAME.unpack_from(data)
        end = 7 + size
        if not size or len(data) != end + 1 or data[end] != constants.FRAME_END:
            raise _NotFast
        if frame_type == constants.FRAME_BODY:
            return end + 1, channel, ContentBody(data[7:end])
        if frame_type == constants.FRAME_HEADER:
            return end + 1, channel, _content_header(data, end)
        if frame_type == constants.FRAME_METHOD:
            index = _INDEX.unpack_from(data, 7)[0]
            if index == _DELIVER:
                return end + 1, channel, _deliver(data, end)
            if index == _ACK and size == 13:
                tag, bits = _ACK_ARGUMENTS.unpack_from(data, 11)
                return end + 1, channel, commands.Basic.Ack(tag, bool(bits & 1))
    except (_NotFast, struct.error, IndexError, UnicodeDecodeError, ValueError):
        pass
    return pamqp.frame.unmarshal(data)


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    start = offset + 1
    return data[start : start + length].decode("utf-8"), start + length


def _deliver(data: bytes, end: int) -> commands.Basic.Deliver:
    consumer_tag, offset = _short_str(data, 11)
    tag = _LONGLONG.unpack_from(data, offset)[0]
    redelivered = bool(data[offset + 8] & 1)
    exchange, offset = _short_str(data, offset + 9)
    routing_key, offset = _short_str(data, offset)
    if offset != end:
        raise _NotFast
    return commands.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)


def _content_header(data: bytes, end: int) -> ContentHeader:
    class_id, weight, body_size, flags = _HEADER.unpack_from(data, 7)
    if flags & 1:  # a second flag word: no property uses one
        raise _NotFast
    offset = 21
    values: dict[str, Any] = {}
    for name, flag, kind in _PROPERTIES:
        if not flags & flag:
            continue
        if kind == "shortstr":
            values[name], offset = _short_str(data, offset)
        elif kind == "octet":
            values[name] = data[offset]
            offset += 1
        else:
            consumed, values[name] = _DECODERS[kind](data[offset:end])
            offset += consumed
    if offset != end:
        raise _NotFast
    header = ContentHeader(weight, body_size, commands.Basic.Properties(**values))
    header.class_id = class_id
    return header


def marshal(frame_value: pamqp.frame.FrameTypes, channel_id: int) -> bytes:
    """``pamqp.frame.marshal``, byte for byte."""
    kind = type(frame_value)
    try:
        if kind is ContentBody:
            assert isinstance(frame_value, ContentBody)
            return _frame(constants.FRAME_BODY, channel_id, frame_value.value)
        if kind is ContentHeader:
            assert isinstance(frame_value, ContentHeader)
            return _frame(constants.FRAME_HEADER, channel_id, _header_payload(frame_value))
        if kind is commands.Basic.Publish:
            assert isinstance(frame_value, commands.Basic.Publish)
            return _frame(constants.FRAME_METHOD, channel_id, _publish_payload(frame_value))
        if kind is commands.Basic.Ack:
            assert isinstance(frame_value, commands.Basic.Ack)
            frame_value.validate()
            tag, multiple = frame_value.delivery_tag, frame_value.multiple
            if not isinstance(tag, int) or not isinstance(multiple, int):
                raise _NotFast
            payload = _ACK_FRAME.pack(_ACK, tag, multiple)
            return _frame(constants.FRAME_METHOD, channel_id, payload)
    except (_NotFast, struct.error, UnicodeEncodeError, TypeError, ValueError):
        pass
    return _PAMQP_MARSHAL(frame_value, channel_id)


def _frame(frame_type: int, channel_id: int, payload: bytes) -> bytes:
    return b"".join((_FRAME.pack(frame_type, channel_id, len(payload)), payload, _FRAME_END))


def _encoded_short_str(value: object) -> bytes:
    if not isinstance(value, str):
        raise _NotFast
    encoded = value.encode("utf-8")
    if len(encoded) > 255:
        raise _NotFast
    return bytes((len(encoded),)) + encoded


def _publish_payload(publish: commands.Basic.Publish) -> bytes:
    publish.validate()
    ticket, mandatory, immediate = publish.ticket, publish.mandatory, publish.immediate
    if not (isinstance(ticket, int) and isinstance(mandatory, int) and isinstance(immediate, int)):
        raise _NotFast
    bits = mandatory | immediate << 1
    return b"".join(
        (
            _PUBLISH.pack(commands.Basic.Publish.index, ticket),
            _encoded_short_str(publish.exchange),
            _encoded_short_str(publish.routing_key),
            bytes((bits,)),
        )
    )


def _header_payload(header: ContentHeader) -> bytes:
    properties = header.properties
    flags = 0
    parts: list[bytes] = []
    for name, flag, kind in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == "shortstr":
            parts.append(_encoded_short_str(value))
        elif kind == "octet":
            if not isinstance(value, int):
                raise _NotFast
            parts.append(bytes((value,)))  # outside 0..255: ValueError, left to pamqp
        else:
            parts.append(_ENCODERS[kind](value))
    return _HEADER_PREFIX.pack(commands.Basic.frame_id, header.body_size, flags) + b"".join(parts)

"""AMQP field tables and message properties, as py-amqp (Celery's client) writes them.

pika's field-table codec cannot send floats and decodes them as truncated integers
(pika/pika#599): :class:`Properties` encodes headers itself (floats as ``d``, as py-amqp),
and :func:`fix_pika_decoding` makes pika's decoder total (the I/O link,
:mod:`conveyor._drivers.amqp.link`, installs it on import, process-wide). :func:`plain`
turns decoded values into plain Python ones. Private plumbing.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pika

from conveyor.core.errors import DecodeError
from conveyor.core.urls import mask_text

__all__ = [
    "COPIED_PROPERTIES",
    "UNDECODABLE_TABLE",
    "Properties",
    "bytes_fields",
    "fix_pika_decoding",
    "plain",
]

# Properties a re-published copy keeps (user_id is dropped: RabbitMQ checks it against the
# publishing connection's user; headers are given separately).
COPIED_PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "app_id", "cluster_id",
)  # fmt: skip


def _encode_value(pieces: list[bytes], value: Any) -> None:
    """One AMQP field-table value, typed as py-amqp (Celery's client) types it.

    pika's own encoder has no ``float`` (py-amqp sends ``d``, a double) and no ``tuple``.
    """
    if isinstance(value, str):
        raw = value.encode("utf-8")
        pieces += [struct.pack(">cI", b"S", len(raw)), raw]
    elif isinstance(value, (bytes, bytearray)):
        pieces += [struct.pack(">cI", b"x", len(value)), bytes(value)]
    elif isinstance(value, bool):
        pieces.append(struct.pack(">cB", b"t", int(value)))
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            pieces.append(struct.pack(">ci", b"I", value))
        else:
            pieces.append(struct.pack(">cq", b"l", value))  # struct.error beyond 64 bits
    elif isinstance(value, float):
        pieces.append(struct.pack(">cd", b"d", value))
    elif value is None:
        pieces.append(b"V")
    elif isinstance(value, Mapping):
        pieces.append(b"F")
        _encode_table(pieces, value)
    elif isinstance(value, (list, tuple)):
        items: list[bytes] = []
        for item in value:
            _encode_value(items, item)
        payload = b"".join(items)
        pieces += [struct.pack(">cI", b"A", len(payload)), payload]
    else:  # Decimal, datetime: pika knows them; anything else raises there
        pika.data.encode_value(pieces, value)


def _encode_table(pieces: list[bytes], table: Mapping[str, Any]) -> None:
    items: list[bytes] = []
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"header keys must be strings, got {key!r}")
        pika.data.encode_short_string(items, key)
        _encode_value(items, value)
    payload = b"".join(items)
    pieces += [struct.pack(">I", len(payload)), payload]


_SHORT_STRING_PROPERTIES = (
    ("content_type", "FLAG_CONTENT_TYPE"),
    ("content_encoding", "FLAG_CONTENT_ENCODING"),
)
_LATER_SHORT_STRINGS = (
    ("correlation_id", "FLAG_CORRELATION_ID"),
    ("reply_to", "FLAG_REPLY_TO"),
    ("expiration", "FLAG_EXPIRATION"),
    ("message_id", "FLAG_MESSAGE_ID"),
)
_LAST_SHORT_STRINGS = (
    ("type", "FLAG_TYPE"),
    ("app_id", "FLAG_APP_ID"),
    ("cluster_id", "FLAG_CLUSTER_ID"),
)


class Properties(pika.BasicProperties):  # type: ignore[misc]
    """``pika.BasicProperties`` whose headers are encoded like py-amqp's (floats as ``d``).

    Supports every property but ``user_id`` (RabbitMQ refuses one that is not the publishing
    connection's user, so a copy conveyor makes of someone else's message drops it). The
    encoding is made once and kept: the publisher measures it against ``frame_max`` before
    pika sends it (a header frame RabbitMQ cannot take closes the whole connection).
    """

    __slots__ = ("_conveyor_encoded",)  # a slot: not in __dict__, so not in repr or ==
    _conveyor_encoded: list[bytes]

    def encode(self) -> list[bytes]:
        try:
            cached: list[bytes] = self._conveyor_encoded
        except AttributeError:
            cached = self._conveyor_encoded = self._encode()
        return cached

    def _encode(self) -> list[bytes]:
        cls = pika.BasicProperties
        pieces: list[bytes] = []
        flags = 0
        for attr, flag in _SHORT_STRING_PROPERTIES:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        if self.headers is not None:
            flags |= cls.FLAG_HEADERS
            _encode_table(pieces, self.headers)
        if self.delivery_mode is not None:
            flags |= cls.FLAG_DELIVERY_MODE
            pieces.append(struct.pack("B", self.delivery_mode))
        if self.priority is not None:
            flags |= cls.FLAG_PRIORITY
            pieces.append(struct.pack("B", self.priority))
        for attr, flag in _LATER_SHORT_STRINGS:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        if self.timestamp is not None:
            flags |= cls.FLAG_TIMESTAMP
            pieces.append(struct.pack(">Q", self.timestamp))
        if self.user_id is not None:
            raise ValueError("conveyor does not send user_id")
        for attr, flag in _LAST_SHORT_STRINGS:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        return [struct.pack(">H", flags), *pieces]


#: Header that stands for a field table pika could not decode (see fix_pika_decoding).
UNDECODABLE_TABLE = "x-conveyor-undecodable-table"


def fix_pika_decoding() -> bool:
    """Make pika's field-table decoder total, on import, process-wide.

    * ``f``/``d`` values decode as floats (pika/pika#599 truncates them to integers, so
      Celery's ``timelimit`` ``[0.5, None]`` would arrive as ``[0, None]``); only while
      pika has the bug.
    * A ``T`` (timestamp) value that Python's datetime cannot hold (RabbitMQ passes any 64
      bits on) decodes as its integer seconds instead of raising ``OverflowError``.
    * A table that still fails to decode becomes ``{UNDECODABLE_TABLE: "<why>"}`` (its length
      prefix says where it ends), and the broker dead-letters that message.

    Without the last two, one such message raised inside pika's frame parser: the
    connection dropped, RabbitMQ redelivered the message, and the consumer looped on it
    forever without delivering anything else. Every other value goes to pika's decoder.
    Returns whether anything was installed.
    """
    data = pika.data
    original_value, original_table = data.decode_value, data.decode_table
    if getattr(original_table, "__conveyor_fix__", False):
        return False
    float_bug = original_value(struct.pack(">cd", b"d", 0.5), 0)[0] != 0.5

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset : offset + 1]
        if kind == b"T":
            stamp = struct.unpack_from(">Q", encoded, offset + 1)[0]
            try:
                return datetime.fromtimestamp(stamp, timezone.utc), offset + 9
            except (OverflowError, ValueError, OSError):
                return stamp, offset + 9
        if float_bug and kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if float_bug and kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        result: tuple[Any, int] = original_value(encoded, offset)
        return result

    def decode_table(encoded: bytes, offset: int) -> tuple[dict[Any, Any], int]:
        try:
            result: tuple[dict[Any, Any], int] = original_table(encoded, offset)
            return result
        except Exception as exc:  # RecursionError, struct.error, an unknown field type...
            end = offset + 4 + struct.unpack_from(">I", encoded, offset)[0]
            return {UNDECODABLE_TABLE: f"{type(exc).__name__}: {mask_text(str(exc))}"[:200]}, end

    decode_value.__conveyor_fix__ = True  # type: ignore[attr-defined]
    decode_table.__conveyor_fix__ = True  # type: ignore[attr-defined]
    data.decode_value = decode_value
    data.decode_table = decode_table
    return True


fix_pika_decoding()


def plain(value: Any) -> Any:
    """pika decodes 64-bit integers as a private ``int`` subclass; make values plain.

    Raises:
        DecodeError: a key that is not text (pika keeps invalid UTF-8 as bytes) or a table
            pika could not decode (see :func:`fix_pika_decoding`).
    """
    kind = type(value)
    if kind is dict:
        if UNDECODABLE_TABLE in value:
            raise DecodeError(f"AMQP field table: {value[UNDECODABLE_TABLE]}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise DecodeError(f"AMQP field table key {k!r:.60} is not UTF-8 text")
            out[k] = plain(v)
        return out
    if kind is list:
        return [plain(v) for v in value]
    if kind is not int and kind is not bool and isinstance(value, int):
        return int(value)
    return value


def bytes_fields(properties: Any) -> str:
    names = ("message_id", "correlation_id", "reply_to", "content_type", "content_encoding")
    return ", ".join(
        f"{name}={getattr(properties, name)!r:.60}"
        for name in names
        if type(getattr(properties, name)) is bytes
    )

"""Envelopes as rows of the SQL broker's table and rows back as deliveries; the stand-in a
row that is not a message becomes (``conveyor.transports._common``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row

from conveyor.core.errors import DecodeError, EncodeError
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
    clamp_priority,
)
from conveyor.transports.sqlalchemy.schema import _STAND_IN, _next_count

__all__ = ["decode_row", "encode_row"]


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``ack``/``reject``/``extend`` need: the row and the lease token of this claim."""

    row_id: int
    token: str


def encode_row(envelope: Envelope, queue: str, delay: float) -> dict[str, Any]:
    try:
        headers = json.dumps(dict(envelope.headers), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"envelope {envelope.id!r} has headers JSON cannot hold: {exc}") from exc
    return {
        "queue": queue,
        "priority": envelope.priority,
        "delayed": delay > 0,
        "delay_": delay,
        "lease_expires": 0.0,
        "delivery_count": 0,
        "envelope_id": envelope.id,
        "body": bytes(envelope.body),
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "headers": headers,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
    }


def decode_row(row: Any, token: str) -> Delivery:
    headers = json.loads(row.headers) if isinstance(row.headers, str) else None
    if not isinstance(headers, dict):
        raise DecodeError(f"row headers are not a JSON object: {row.headers!r:.100}")
    if row.dead_from is not None:
        headers[DEAD_LETTER_REASON_HEADER] = str(row.dead_reason or "")
        headers[DEAD_LETTER_SOURCE_HEADER] = row.dead_from
    for name in ("envelope_id", "content_type", "content_encoding"):
        if not isinstance(getattr(row, name), str):
            raise DecodeError(f"row column {name} is not text")
    for name in ("correlation_id", "reply_to"):
        if not isinstance(getattr(row, name), str | None):
            raise DecodeError(f"row column {name} is not text")
    if not isinstance(row.body, bytes | bytearray | memoryview):
        raise DecodeError("row column body is not binary")
    envelope = Envelope(
        id=row.envelope_id,
        body=bytes(row.body),
        content_type=row.content_type,
        content_encoding=row.content_encoding,
        headers=headers,
        priority=clamp_priority(row.priority),
        correlation_id=row.correlation_id,
        reply_to=row.reply_to,
    )
    # A claimed row has been delivered at least once, whatever a foreign writer stored.
    count = max(int(row.delivery_count), 1)
    return Delivery(
        envelope=envelope,
        queue=row.queue,
        receipt=_Receipt(int(row.id), token),
        redelivered=count > 1,
        delivery_count=count,
    )


def _stand_in_fields(row: Any) -> dict[str, Any]:
    """The columns that make an undecodable row a readable stand-in (``_common``)."""
    original = {c: _plain_column(getattr(row, c)) for c in _STAND_IN if c != "body"}
    body = row.body
    if not isinstance(body, bytes | bytearray | memoryview):
        body = str(_plain_column(body)).encode("utf-8", "backslashreplace")
    ident = original["envelope_id"]
    if not (isinstance(ident, str) and len(ident) <= 255):
        ident = hashlib.sha256(repr(original).encode()).hexdigest()[:32]
    return {
        "raw_body": bytes(body),
        "raw_envelope_id": ident,
        "raw_content_type": UNDECODABLE_CONTENT_TYPE,
        "raw_content_encoding": "binary",
        "raw_headers": json.dumps({ORIGINAL_HEADER: original}, separators=(",", ":")),
        "raw_priority": 0,
        "raw_correlation_id": None,
        "raw_reply_to": None,
    }


def _int_or_0(value: Any) -> int:
    return value if type(value) is int else 0


def _plain_column(value: Any) -> Any:
    """A column value as JSON can hold it (for the stand-in's ``x-conveyor-original``)."""
    if value is None or (isinstance(value, str | int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


class _Bumped:
    """A row read before its claim UPDATE, seen as after it (see :func:`_next_count`)."""

    __slots__ = ("_row",)

    def __init__(self, row: Row[Any]) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._row, name)
        return _next_count(value) if name == "delivery_count" else value

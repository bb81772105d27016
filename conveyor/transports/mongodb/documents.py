"""Envelopes as documents of the MongoDB broker's collection and documents back as
deliveries; receipts and the guard that settles them; the claim's delivery-count update;
times as BSON keeps them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
)
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    clamp_priority,
)

__all__ = ["decode_document", "encode_document"]

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)  # lease_expires of a message nobody holds
_READY = "ready"
_DELAYED = "delayed"


def _now() -> datetime:
    """The client clock, aware UTC. BSON keeps milliseconds: used as "now" in filters it is
    truncated (floor), so ``due <= now`` never lets a message through early."""
    return datetime.now(_UTC)


def _ceil_ms(value: datetime) -> datetime:
    """Round up to a whole millisecond, so a stored deadline is never earlier than asked."""
    extra = value.microsecond % 1000
    return value if extra == 0 else value + timedelta(microseconds=1000 - extra)


def _check_seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigurationError(f"{what} must be a positive number of seconds: {value!r}")
    return float(value)


# delivery_count as a claim sets it (an update pipeline, so it stays one round trip): a
# count below 0 (planted, it would lift worker_max_deliveries) restarts at 1; a count at
# _COUNT_MAX or more stays (2**63-1 + 1 cannot be stored: the claim would fail for the whole
# queue; so far past worker_max_deliveries the message is refused); a missing count is 0; a
# count that is not a number (text, an array) is left as it is, and the claim that picks the
# document dead-letters it (``_delivery`` refuses it) instead of failing like $inc would.
_COUNT_MAX = 2**31 - 1
_COUNT = {"$ifNull": ["$delivery_count", 0]}
_NEXT_COUNT = {
    "$switch": {
        "branches": [
            {
                "case": {"$not": [{"$in": [{"$type": _COUNT}, ["int", "long", "double"]]}]},
                "then": _COUNT,
            },
            {"case": {"$lt": [_COUNT, 0]}, "then": 1},
            {"case": {"$gte": [_COUNT, _COUNT_MAX]}, "then": _COUNT},
        ],
        "default": {"$add": [_COUNT, 1]},
    }
}


def _guard(receipt: _Receipt) -> dict[str, Any]:
    """The filter "this delivery still holds its document". ``$eq``: a document id that is
    itself a map is compared, never read as query operators."""
    return {"_id": {"$eq": receipt.doc_id}, "lease_owner": {"$eq": receipt.token}}


class _AnyId:
    """A document id that is not hashable (a map or list some other writer chose), made
    usable as a key by its ``repr``; :func:`_id_value` gives the id back."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = repr(value)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AnyId) and other.key == self.key


def _id_key(doc_id: Any) -> Any:
    """A hashable key for a document id (ObjectIds and strings are their own)."""
    try:
        hash(doc_id)
    except TypeError:
        return _AnyId(doc_id)
    return doc_id


def _id_value(key: Any) -> Any:
    return key.value if isinstance(key, _AnyId) else key


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``ack``/``reject``/``extend`` need: the document and this claim's lease token."""

    doc_id: Any
    token: str


def encode_document(envelope: Envelope, queue: str, delay: float | None) -> dict[str, Any]:
    try:
        headers = json.dumps(dict(envelope.headers), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"headers of {envelope.id!r} are not JSON-representable: {exc}") from exc
    if not isinstance(envelope.body, bytes | bytearray | memoryview):
        raise EncodeError(f"body of {envelope.id!r} must be bytes")
    now = _now()
    due = now
    if delay is not None and delay > 0:
        try:
            due = _ceil_ms(now + timedelta(seconds=float(delay)))
        except (OverflowError, ValueError):
            raise ConfigurationError(
                f"delay {delay!r}s is longer than the MongoDB broker can hold: its due time "
                "must be before the year 10000 (BSON dates as Python reads them)"
            ) from None
    return {
        "queue": queue,
        "state": _DELAYED if due is not now else _READY,
        "priority": int(envelope.priority),
        "due": due,
        "lease_owner": None,
        "lease_expires": _EPOCH,
        "delivery_count": 0,
        "message_id": envelope.id,
        "body": bytes(envelope.body),
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "headers": headers,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
        "published_at": now,
    }


def decode_document(doc: Mapping[str, Any], token: str, names: Sequence[str]) -> Delivery:
    raw = doc.get("headers")
    headers = json.loads(raw) if isinstance(raw, str) else None
    if not isinstance(headers, dict):
        raise DecodeError(f"headers are not JSON text of a map: {raw!r:.100}")
    if doc.get("dead_from") is not None:
        headers[DEAD_LETTER_REASON_HEADER] = str(doc.get("dead_reason") or "")
        headers[DEAD_LETTER_SOURCE_HEADER] = str(doc["dead_from"])
    queue = doc.get("queue")
    if not (isinstance(queue, str) and queue in names):
        raise DecodeError(f"queue is not one of the names received from: {queue!r:.100}")
    for name in ("message_id", "content_type", "content_encoding"):
        if not isinstance(doc.get(name), str):
            raise DecodeError(f"{name} is not a string: {doc.get(name)!r:.100}")
    for name in ("correlation_id", "reply_to"):
        if not isinstance(doc.get(name), str | None):
            raise DecodeError(f"{name} is not a string: {doc.get(name)!r:.100}")
    body = doc.get("body")
    if not isinstance(body, bytes):  # BSON binary (subtype 0) reads as bytes
        raise DecodeError(f"body is not binary: {type(body).__name__}")
    count = doc.get("delivery_count")
    if isinstance(count, float) and count.is_integer():
        count = int(count)  # a number $inc made from a double some client wrote
    if isinstance(count, bool) or not isinstance(count, int):
        raise DecodeError(f"delivery_count is not an integer: {count!r:.40}")
    count = max(count, 1)  # claimed: delivered at least once, whatever was stored
    envelope = Envelope(
        id=doc["message_id"],
        body=body,
        content_type=doc["content_type"],
        content_encoding=doc["content_encoding"],
        headers=headers,
        priority=clamp_priority(doc.get("priority")),
        correlation_id=doc.get("correlation_id"),
        reply_to=doc.get("reply_to"),
    )
    return Delivery(
        envelope=envelope,
        queue=queue,
        receipt=_Receipt(doc["_id"], token),
        redelivered=count > 1,
        delivery_count=count,
    )

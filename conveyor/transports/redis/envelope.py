"""kombu's Redis envelope: the JSON text of one message in kombu's lists (Celery 5.x's
layout, byte-compatible), its redelivery marks and the stand-in for an undecodable one. The
layout and the priority mapping are described in :mod:`conveyor.transports.redis`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from conveyor.core.errors import DecodeError
from conveyor.core.serializers import kombu_json_load, kombu_json_text
from conveyor.core.types import Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    UNDECODABLE_CONTENT_TYPE,
    clean_text,
)

__all__ = ["KOMBU_MAX_PRIORITY", "decode_envelope", "encode_envelope", "undecodable_stand_in"]

#: kombu's highest priority number (its LEAST urgent on Redis): conveyor's ``p`` is ``9 - p``.
KOMBU_MAX_PRIORITY = 9
# Headers conveyor adds on redelivery; never part of the Envelope handed to a consumer.
_REDELIVERED = "redelivered"
_COUNT = "x-delivery-count"
_AMBIGUOUS = b"conveyor-ambiguous-headers:"  # common.lua's AMBIGUOUS
_COUNT_KEY = b'"x-delivery-count"'

_kombu_dumps: Callable[[Any], str] = kombu_json_text
_kombu_loads: Callable[[bytes], Any] = kombu_json_load


def _derived_id(headers: Mapping[str, Any], correlation_id: str | None) -> str | None:
    """The id a reader derives without ``message_id``: Celery's ``headers.id``, else the
    correlation id."""
    hid = headers.get("id")
    return hid if isinstance(hid, str) and hid else correlation_id


def encode_envelope(envelope: Envelope, queue: str, kombu_priority: int) -> str:
    """kombu's Redis JSON envelope for ``envelope`` published to ``queue``.

    Property order and values are what Celery 5.7 writes; ``message_id`` (an AMQP property
    kombu passes through) is added only when the envelope's id is not Celery's ``headers.id``
    / correlation id, so Celery's own messages are unchanged.
    """
    properties: dict[str, Any] = {}
    if envelope.correlation_id is not None:
        properties["correlation_id"] = envelope.correlation_id
    if envelope.reply_to is not None:
        properties["reply_to"] = envelope.reply_to
    properties["delivery_mode"] = 2
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    properties["priority"] = kombu_priority
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = str(uuid.uuid4())
    headers = dict(envelope.headers)
    if envelope.id != _derived_id(headers, envelope.correlation_id):
        properties["message_id"] = envelope.id
    return _kombu_dumps(
        {
            "body": base64.b64encode(envelope.body).decode("ascii"),
            "content-encoding": envelope.content_encoding,
            "content-type": envelope.content_type,
            "headers": headers,
            "properties": properties,
        }
    )


def decode_envelope(raw: bytes | str) -> tuple[Envelope, bool, int | None]:
    """Parse a kombu Redis envelope: ``(envelope, redelivered, delivery_count)``.

    kombu's ``priority`` ``k`` becomes conveyor priority ``9 - k`` (module docstring,
    "Priorities"). The redelivery headers are removed from the envelope.

    Raises:
        DecodeError: whatever is wrong with it (never another exception): not JSON, not a map,
            headers that are not a map or come after another object (the redelivery marks
            could not be placed, so its deliveries could not be counted), a priority that is
            not a number (``Infinity``), a body that is not valid base64, fields of the wrong
            type.
    """
    try:
        return _decode_envelope(raw)
    except DecodeError:
        raise
    except Exception as exc:  # any shape of bad input is a DecodeError, never a crash
        raise DecodeError(f"malformed kombu envelope: {type(exc).__name__}: {exc}") from exc


def _decode_envelope(raw: bytes | str) -> tuple[Envelope, bool, int | None]:
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
    try:
        msg = _kombu_loads(data)
    except Exception as exc:
        if data.startswith(_AMBIGUOUS):  # the Lua scripts' mark (common.lua)
            raise DecodeError("envelope has more than one headers member") from exc
        raise DecodeError(f"not a kombu JSON envelope: {exc}") from exc
    if not isinstance(msg, dict):
        raise DecodeError("a kombu envelope must be a JSON object")
    # The Lua scripts mark a redelivery inside the FIRST object member named "headers" in the
    # text (common.lua); with only scalars before the top-level "headers", that is the
    # top-level one. kombu always writes it so; anything else could never be counted.
    for key, value in msg.items():
        if key == "headers":
            break
        if isinstance(value, dict | list):
            raise DecodeError(f"envelope member {key!r} comes before its headers")
    headers = msg.get("headers")
    props = msg.get("properties")
    if props is None:
        props = {}
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise DecodeError("envelope headers and properties must be objects")
    headers = dict(headers)
    redelivered = bool(headers.pop(_REDELIVERED, False))
    prior = headers.pop(_COUNT, None)
    if prior is not None and _key_marks(raw, _COUNT_KEY) != 1:
        # A header of the sender's own under the name of the count would shadow conveyor's
        # mark (JSON keeps the last duplicate) and freeze the count: never trust it.
        raise DecodeError(f"envelope carries its own {_COUNT!r} header")
    info = props.get("delivery_info")
    if isinstance(info, dict) and info.get("redelivered"):
        redelivered = True
    body: Any = msg.get("body", "")
    try:
        if props.get("body_encoding") == "base64":
            data = base64.b64decode(body, validate=True) if body else b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            raise TypeError(f"body is a JSON {type(body).__name__}")
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"envelope body is not valid: {exc}") from exc
    raw_priority = props.get("priority")
    try:
        kombu_priority = int(raw_priority) if raw_priority is not None else 0
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"envelope priority {raw_priority!r:.40} is not an integer") from exc
    kombu_priority = min(max(kombu_priority, 0), KOMBU_MAX_PRIORITY)
    correlation_id = props.get("correlation_id")
    if correlation_id is not None and type(correlation_id) is not str:
        correlation_id = _optional_text(props, "correlation_id")
    reply_to = props.get("reply_to")
    if reply_to is not None and type(reply_to) is not str:
        reply_to = _optional_text(props, "reply_to")
    content_type = msg.get("content-type") or "application/data"
    content_encoding = msg.get("content-encoding") or "binary"
    if not isinstance(content_type, str) or not isinstance(content_encoding, str):
        raise DecodeError("envelope content-type and content-encoding must be strings")
    message_id = props.get("message_id")
    env_id = (
        message_id
        if isinstance(message_id, str)
        else (_derived_id(headers, correlation_id) or str(props.get("delivery_tag") or ""))
    )
    envelope = Envelope(
        id=env_id,
        body=data,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        priority=KOMBU_MAX_PRIORITY - kombu_priority,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )
    if not redelivered:
        count: int | None = 1
    elif isinstance(prior, int) and not isinstance(prior, bool):
        count = prior + 1
    else:
        count = None  # restored by kombu: it does not count
    return envelope, redelivered, count


def _optional_text(props: Mapping[str, Any], key: str) -> str | None:
    value = props.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a number some client wrote for an id: still one
    raise DecodeError(f"envelope property {key!r} must be a string")


def _key_marks(raw: bytes | str, key: bytes) -> int:
    """How often ``key`` (a quoted JSON string) occurs as a member name: followed by a colon
    (a string value never is, and a quote inside a string is escaped). Slow path only."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    return len(re.findall(re.escape(key) + rb"[ \t\r\n]*:", data))


def undecodable_stand_in(raw: bytes | str, queue: str, reason: str) -> str:
    """The well-formed envelope dead-lettered in place of an undecodable one (``_common``):
    its body is the original text, its id the original's where one can be read."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    ident = ""
    with contextlib.suppress(Exception):
        msg = _kombu_loads(data)
        if isinstance(msg, dict):
            props, headers = msg.get("properties"), msg.get("headers")
            for candidate in (
                props.get("message_id") if isinstance(props, dict) else None,
                headers.get("id") if isinstance(headers, dict) else None,
                props.get("correlation_id") if isinstance(props, dict) else None,
            ):
                if isinstance(candidate, str) and candidate and len(candidate) <= 255:
                    ident = candidate
                    break
    envelope = Envelope(
        id=clean_text(ident, 255) if ident else hashlib.sha256(data).hexdigest()[:32],
        body=data,
        content_type=UNDECODABLE_CONTENT_TYPE,
        content_encoding="binary",
        headers={DEAD_LETTER_REASON_HEADER: reason, DEAD_LETTER_SOURCE_HEADER: queue},
    )
    return encode_envelope(envelope, queue + DEAD_LETTER_SUFFIX, KOMBU_MAX_PRIORITY)

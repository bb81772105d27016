"""Celery task messages: protocol v2 built (``build_envelope``), v1 and v2 read
(``parse_envelope``, ``peek``).

Part of :mod:`conveyor.core.celery` (the Celery 5.x wire formats, whose docstring lists the
deliberate deviations from Celery); import the names from there. The wire rules it follows
is ``docs/celery-compat.md`` (#task-messages).

Thread-safety: pure functions of their arguments (plus the registry passed in); safe from any
thread.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from conveyor.core.celery._common import _MAP, _UTC, _brief, _malformed, _parse_time
from conveyor.core.celery.saferepr import REPR_MAXLEN, REPR_MAXLEVELS, saferepr
from conveyor.core.compression import BUILTIN_METHODS, DEFAULT_MAX_SIZE, compress, decompress
from conveyor.core.errors import ConfigurationError, DecodeError, EncodeError, SerializationError
from conveyor.core.serializers import SerializerRegistry, default_serializers
from conveyor.core.types import Envelope

__all__ = [
    "MAX_TIME_LIMIT",
    "Signature",
    "TaskMessage",
    "TaskPeek",
    "build_envelope",
    "default_origin",
    "parse_envelope",
    "peek",
]


Signature = Mapping[str, Any]
"""A Celery signature as plain data: ``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``."""


# ================================================================================ messages


def default_origin() -> str:
    """Celery's node name for a non-worker sender: ``gen<pid>@<hostname>``.

    Computed per call, so a forked child reports its own pid.
    """
    return f"gen{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One Celery task invocation, independent of any wire format.

    ``args`` given as a list is stored as a tuple. The message is immutable but holds
    mappings, so it is not hashable.

    Attributes:
        task: registered task name (dispatch key).
        id: task id (a UUID string).
        args: positional arguments.
        kwargs: keyword arguments (string keys).
        callbacks: signatures to apply with the result (``link``).
        errbacks: signatures to apply on failure (``link_error``).
        chain: signatures still to run, **last element next** (Celery's reversed order).
        chord: the chord body signature, for a chord header task.
        eta: earliest execution time (aware). Build treats a naive value as UTC.
        expires: absolute expiry (aware). Build treats a naive value as UTC.
        retries: retry counter, 0 on the first send.
        timelimit: ``(hard, soft)`` seconds, each None when unset.
        root_id: first task of the workflow; None means "this task" (``id``).
        parent_id: the task that sent this one.
        group: id of the group this task belongs to.
        group_index: position within the group.
        shadow: alternative display name.
        origin: sender node name; None means :func:`default_origin` at build time.
        ignore_result: the worker must not store a result.
        stamped_headers: names of stamps (canvas stamping), or None.
        stamps: stamp name -> value(s).
        replaced_task_nesting: depth of ``Task.replace`` nesting.
        headers: extra (user) headers, merged at the top level of the message headers.
        reply_to: reply queue (Celery always sets its per-thread oid; only ``rpc://`` uses it).
        priority: 0-9.
        correlation_id: None means ``id`` (what Celery sends).
        argsrepr: display text for args; None means computed with :func:`saferepr`.
        kwargsrepr: display text for kwargs; None means computed.
    """

    task: str
    id: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    callbacks: Sequence[Signature] | None = None
    errbacks: Sequence[Signature] | None = None
    chain: Sequence[Signature] | None = None
    chord: Signature | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    timelimit: tuple[float | None, float | None] = (None, None)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    shadow: str | None = None
    origin: str | None = None
    ignore_result: bool = False
    stamped_headers: tuple[str, ...] | None = None
    stamps: Mapping[str, Any] = field(default_factory=dict)
    replaced_task_nesting: int = 0
    headers: Mapping[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    priority: int = 0
    correlation_id: str | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None

    def __post_init__(self) -> None:
        args: Any = self.args  # callers may pass a list despite the annotation
        if not isinstance(args, tuple):
            if not isinstance(args, list):
                raise TypeError(f"task args must be a list or tuple, not {type(args)}")
            object.__setattr__(self, "args", tuple(args))
        kwargs: Any = self.kwargs
        if not isinstance(kwargs, _MAP):
            raise TypeError(f"task kwargs must be a mapping, not {type(kwargs)}")


class TaskPeek(NamedTuple):
    """What :func:`peek` reads from the headers alone.

    ``task`` is None for a protocol v1 message (its name is in the body).
    """

    task: str | None
    id: str
    eta: datetime | None
    expires: datetime | None


#: Header keys the protocol defines; anything else is a user ("extra") header.
_PROTOCOL_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "compression",
    }
)
#: Keys of a protocol v1 body that are not header fields.
_V1_PAYLOAD_KEYS = frozenset(
    {"args", "kwargs", "callbacks", "errbacks", "chord", "chain", "utc", "taskset"}
)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=_UTC)
    return value.isoformat()


def build_envelope(
    msg: TaskMessage,
    *,
    serializer: str = "json",
    compression: str | None = None,
    serializers: SerializerRegistry | None = None,
) -> Envelope:
    """Encode ``msg`` as the protocol v2 message Celery 5.7 sends.

    Headers carry every key of ``docs/celery-compat.md#protocol-v2-headers`` (null when
    unused), then ``msg.headers``, then ``compression`` when compressed. The body is
    ``[args, kwargs, embed]``.

    Args:
        msg: the task message.
        serializer: serializer name or content type for the body.
        compression: compression alias or MIME type, or None.
        serializers: registry to use; the default registry when None.

    Returns:
        The envelope (``id`` and ``correlation_id`` = task id unless ``msg`` overrides the
        correlation id).

    Raises:
        EncodeError: the body cannot be serialized, or an extra header reuses a protocol key.
        ConfigurationError: unknown serializer or compression (``MissingDependency`` when
            its package is missing).
    """
    reg = serializers if serializers is not None else default_serializers
    # Encode first: a value the serializer refuses is an EncodeError before any other work.
    kwargs = msg.kwargs if isinstance(msg.kwargs, dict) else dict(msg.kwargs)
    embed = {
        "callbacks": msg.callbacks,
        "errbacks": msg.errbacks,
        "chain": msg.chain,
        "chord": msg.chord,
    }
    body, content_type, content_encoding = reg.encode((msg.args, kwargs, embed), serializer)
    hard, soft = msg.timelimit
    headers: dict[str, Any] = {
        "lang": "py",
        "task": msg.task,
        "id": msg.id,
        "shadow": msg.shadow,
        "eta": _iso(msg.eta),
        "expires": _iso(msg.expires),
        "group": msg.group,
        "group_index": msg.group_index,
        "retries": msg.retries,
        "timelimit": [hard, soft],
        "root_id": msg.root_id or msg.id,
        "parent_id": msg.parent_id,
        "argsrepr": msg.argsrepr
        if msg.argsrepr is not None
        else saferepr(msg.args, REPR_MAXLEN, REPR_MAXLEVELS),
        "kwargsrepr": msg.kwargsrepr
        if msg.kwargsrepr is not None
        else saferepr(msg.kwargs, REPR_MAXLEN, REPR_MAXLEVELS),
        "origin": msg.origin or default_origin(),
        "ignore_result": msg.ignore_result,
        "replaced_task_nesting": msg.replaced_task_nesting,
        "stamped_headers": list(msg.stamped_headers) if msg.stamped_headers is not None else None,
        "stamps": dict(msg.stamps),
    }
    if msg.headers:
        clash = _PROTOCOL_HEADERS.intersection(msg.headers)
        if clash:
            raise EncodeError(
                f"extra headers {sorted(clash)} would overwrite protocol headers; "
                "set the TaskMessage field instead"
            )
        headers.update(msg.headers)
    if compression:
        body, headers["compression"] = compress(body, compression)
    return Envelope(
        id=msg.id,
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        priority=msg.priority,
        correlation_id=msg.correlation_id or msg.id,
        reply_to=msg.reply_to,
    )


def peek(envelope: Envelope) -> TaskPeek:
    """Read task name, id, eta and expires from the headers only (no body decoding).

    Cheap enough to run on every delivery, e.g. to drop an expired task before decoding it.
    A protocol v1 message has no ``task`` header: ``task``, ``eta`` and ``expires`` come back
    None and only :func:`parse_envelope` can tell more.

    Raises:
        DecodeError: the headers are not a map, or ``eta``/``expires`` is present but not a
            valid time. Nothing else, whatever the input: any other exception while reading
            is raised as a ``DecodeError`` chained to it.
    """
    try:
        return _peek(envelope)
    except SerializationError:
        raise
    except Exception as exc:  # OverflowError, RecursionError, AttributeError, ...
        raise _malformed("message headers", exc) from exc


def _peek(envelope: Envelope) -> TaskPeek:
    headers: Any = envelope.headers  # typed a mapping; from outside it may be anything
    if headers is None:
        headers = {}
    elif not isinstance(headers, _MAP):
        raise DecodeError(f"message headers must be a map, got {type(headers).__name__}")
    task = headers.get("task")
    if not isinstance(task, str):
        return TaskPeek(None, envelope.id, None, None)
    task_id = headers.get("id")
    return TaskPeek(
        task,
        task_id if isinstance(task_id, str) and task_id else envelope.id,
        _parse_time(headers.get("eta"), "eta"),
        _parse_time(headers.get("expires"), "expires"),
    )


def _decode_body(
    envelope: Envelope,
    reg: SerializerRegistry,
    accept: Any,
    max_size: int | None,
    accept_compression: Collection[str] | str | None,
) -> Any:
    # Refuse disallowed content before spending anything on decompression.
    content_type = envelope.content_type
    if not isinstance(content_type, str):
        raise DecodeError(f"content type must be a string, got {type(content_type).__name__}")
    reg.check_accept(content_type, accept)
    body = envelope.body
    method = (envelope.headers or {}).get("compression")
    if method:
        if not isinstance(method, str):
            raise DecodeError(f"compression header must be a string, got {_brief(method)}")
        try:
            body = decompress(body, method, max_size=max_size, accept=accept_compression)
        except ConfigurationError as exc:  # unknown or uninstalled: the message is unusable
            raise DecodeError(f"cannot decompress message body: {exc}") from exc
    return reg.decode(body, envelope.content_type, envelope.content_encoding, accept=accept)


def _str_or_none(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"header {key!r} must be a string or null, got {type(value).__name__}")


def _text_or_none(fields: Mapping[str, Any], key: str) -> str | None:
    # Display-only fields: coerce rather than reject a message for them.
    value = fields.get(key)
    return value if value is None or isinstance(value, str) else str(value)


def _int(fields: Mapping[str, Any], key: str, default: int | None) -> Any:
    value = fields.get(key)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DecodeError(f"header {key!r} must be an integer, got {_brief(value)}")


#: The range of the integer headers (``retries``, ``group_index``, ``replaced_task_nesting``):
#: a SQL INTEGER column holds them, and no sender counts further.
_MAX_COUNT = 2**31 - 1
#: The largest ``timelimit`` entry accepted, in seconds (about 31 years): timers overflow
#: somewhere beyond, and no task asks for more.
MAX_TIME_LIMIT = 1e9


def _count(fields: Mapping[str, Any], key: str, default: int | None) -> Any:
    value = _int(fields, key, default)
    if value is not None and not 0 <= value <= _MAX_COUNT:
        raise DecodeError(f"header {key!r} must be 0..{_MAX_COUNT}, got {_brief(value)}")
    return value


def _seconds(value: Any) -> float | None:
    """One ``timelimit`` entry: None, or a finite number of seconds 0..MAX_TIME_LIMIT.

    Anything else (text, NaN, infinities, negative or huge values, booleans) is a
    DecodeError: running a task without the limit its sender asked for would be wrong, so
    the message is refused rather than the entry ignored. 0 means no limit, as in Celery.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if 0.0 <= seconds <= MAX_TIME_LIMIT:  # NaN fails both comparisons
            return value
    raise DecodeError(
        f"timelimit entries must be null or seconds 0..{MAX_TIME_LIMIT:.0f}, got {_brief(value)}"
    )


def _signatures(value: Any, key: str) -> list[Signature] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(s, _MAP) for s in value):
        return list(value)
    raise DecodeError(f"embed {key!r} must be a list of signature maps or null")


def _task_message(
    fields: Mapping[str, Any],
    args: Any,
    kwargs: Any,
    embed: Any,
    envelope: Envelope,
    *,
    utc: bool,
    extras_from: Mapping[str, Any],
) -> TaskMessage:
    """Validate decoded parts and build the message; every failure is a DecodeError."""
    task, task_id = fields.get("task"), fields.get("id")
    if not isinstance(task, str) or not task:
        raise DecodeError(f"task name must be a non-empty string, got {_brief(task)}")
    if not isinstance(task_id, str) or not task_id:
        raise DecodeError(f"task id must be a non-empty string, got {_brief(task_id)}")
    if not isinstance(args, (list, tuple)):
        raise DecodeError(f"task args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DecodeError("task kwargs must be a map with string keys")
    if embed is None:
        embed = {}
    elif not isinstance(embed, _MAP):
        raise DecodeError(f"embed must be a map or null, got {type(embed).__name__}")
    chord = embed.get("chord")
    if chord is not None and not isinstance(chord, _MAP):
        raise DecodeError("embed 'chord' must be a signature map or null")

    timelimit = fields.get("timelimit")
    if timelimit is None:
        limits: tuple[float | None, float | None] = (None, None)
    elif isinstance(timelimit, (list, tuple)) and len(timelimit) == 2:
        limits = (_seconds(timelimit[0]), _seconds(timelimit[1]))
    else:
        raise DecodeError(f"timelimit must be [hard, soft], got {_brief(timelimit)}")

    stamped = fields.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, (list, tuple)) and all(isinstance(s, str) for s in stamped)
    ):
        raise DecodeError("stamped_headers must be a list of strings or null")
    stamps = fields.get("stamps") or {}
    if not isinstance(stamps, _MAP):
        raise DecodeError("stamps must be a map")
    ignore_result = fields.get("ignore_result")
    skip = _PROTOCOL_HEADERS.union(stamped) if stamped else _PROTOCOL_HEADERS
    extras = {k: v for k, v in extras_from.items() if k not in skip}
    if not all(isinstance(k, str) for k in extras):
        raise DecodeError("header names must be strings")

    return TaskMessage(
        task=task,
        id=task_id,
        args=tuple(args),
        kwargs=kwargs,
        callbacks=_signatures(embed.get("callbacks"), "callbacks"),
        errbacks=_signatures(embed.get("errbacks"), "errbacks"),
        chain=_signatures(embed.get("chain"), "chain"),
        chord=chord,
        eta=_parse_time(fields.get("eta"), "eta", utc=utc),
        expires=_parse_time(fields.get("expires"), "expires", utc=utc),
        retries=_count(fields, "retries", 0),
        timelimit=limits,
        root_id=_str_or_none(fields, "root_id"),
        parent_id=_str_or_none(fields, "parent_id"),
        group=_str_or_none(fields, "group"),
        group_index=_count(fields, "group_index", None),
        shadow=_text_or_none(fields, "shadow"),
        origin=_text_or_none(fields, "origin"),
        ignore_result=bool(ignore_result),
        stamped_headers=tuple(stamped) if stamped is not None else None,
        stamps=dict(stamps),
        replaced_task_nesting=_count(fields, "replaced_task_nesting", 0),
        headers=extras,
        reply_to=envelope.reply_to,
        priority=envelope.priority,
        correlation_id=envelope.correlation_id,
        argsrepr=_text_or_none(fields, "argsrepr"),
        kwargsrepr=_text_or_none(fields, "kwargsrepr"),
    )


def parse_envelope(
    envelope: Envelope,
    *,
    accept: Any = None,
    serializers: SerializerRegistry | None = None,
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept_compression: Collection[str] | str | None = BUILTIN_METHODS,
) -> TaskMessage:
    """Decode a Celery task message of any 5.x form.

    * **v2**: headers contain ``task``; the body must be exactly
      ``[args(list), kwargs(map), embed(map|null)]``.
    * **hybrid**: headers contain ``task`` and the body is a v1 map; header values win.
    * **v1**: no ``task`` header; the body is a map with ``task``, ``id``, ``args``, ...

    Args:
        envelope: the message.
        accept: serializer names and/or content types allowed (ideally a frozenset from
            :meth:`SerializerRegistry.normalize_accept`); None means JSON only.
        serializers: registry; the default one when None.
        max_size: limit on the decompressed body in bytes (None: no limit); decoding stops
            there, it does not inflate first and measure after.
        accept_compression: compression methods allowed (the ``accept_compression``
            setting, ideally normalized once with
            :func:`~conveyor.core.compression.normalize_accept_compression`); None or
            empty: a compressed message is refused.

    Raises:
        ContentDisallowed: the content type or the compression method is not accepted
            (checked before anything is decoded).
        DecodeError: corrupt or oversized body, bad compression header, wrong body shape,
            or a header of the wrong type or out of range. Dead-letter such messages.
            Nothing else is raised for any input: an unexpected exception while decoding
            (OverflowError, RecursionError, a missing codec, ...) becomes a DecodeError
            chained to it.
    """
    try:
        return _parse_envelope(envelope, accept, serializers, max_size, accept_compression)
    except SerializationError:
        raise
    except Exception as exc:
        raise _malformed("task message", exc) from exc


def _parse_envelope(
    envelope: Envelope,
    accept: Any,
    serializers: SerializerRegistry | None,
    max_size: int | None,
    accept_compression: Collection[str] | str | None,
) -> TaskMessage:
    reg = serializers if serializers is not None else default_serializers
    headers = envelope.headers if envelope.headers is not None else {}
    if not isinstance(headers, _MAP):
        raise DecodeError(f"message headers must be a map, got {type(headers).__name__}")
    body = _decode_body(envelope, reg, accept, max_size, accept_compression)

    if "task" in headers:
        if isinstance(body, (list, tuple)):
            if len(body) != 3:
                raise DecodeError(
                    f"protocol v2 body must be [args, kwargs, embed] (3 items), "
                    f"got {len(body)} items"
                )
            args, kwargs, embed = body
            return _task_message(
                headers, args, kwargs, embed, envelope, utc=True, extras_from=headers
            )
        if isinstance(body, _MAP):  # hybrid: a v1 body under v2 headers
            merged = {k: v for k, v in body.items() if k not in _V1_PAYLOAD_KEYS}
            merged.update(headers)
            embed = {k: body.get(k) for k in ("callbacks", "errbacks", "chord")}
            return _task_message(
                merged,
                body.get("args", ()),
                body.get("kwargs", {}),
                embed,
                envelope,
                utc=bool(body.get("utc", True)),
                extras_from=headers,
            )
        raise DecodeError(
            f"protocol v2 body must be [args, kwargs, embed], got {type(body).__name__}"
        )

    if isinstance(body, _MAP) and "task" in body:
        fields = dict(headers)
        fields.update((k, v) for k, v in body.items() if k not in _V1_PAYLOAD_KEYS)
        if fields.get("group") is None and body.get("taskset") is not None:
            fields["group"] = body["taskset"]
        embed = {k: body.get(k) for k in ("callbacks", "errbacks", "chord")}
        return _task_message(
            fields,
            body.get("args", ()),
            body.get("kwargs", {}),
            embed,
            envelope,
            utc=bool(body.get("utc", True)),
            extras_from=headers,
        )
    raise DecodeError(
        "not a Celery task message: no 'task' header and the body is not a protocol v1 map"
    )

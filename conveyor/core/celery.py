"""Celery 5.x wire formats: task messages (protocol v2, reading v1) and result metas.

This module turns a :class:`TaskMessage` into the exact :class:`~conveyor.core.types.Envelope`
Celery 5.7 sends (``build_envelope``), reads any Celery 5.x task message back
(``parse_envelope``, ``peek``), and converts :class:`~conveyor.core.types.ResultRecord` to and
from Celery's result meta document (``meta_from_record``, ``record_from_meta``,
``encode_meta``, ``decode_meta``). The normative description is ``celery-wire.md`` sections 1
and 4; the golden tests in ``tests/unit/test_celery_protocol.py`` compare against real Celery.

Deviations from Celery, on purpose:

* **Naive ``eta``/``expires`` are read as UTC** in protocol v2 (Celery reads them in the
  worker's local timezone). We always *send* timezone-aware values, as Celery does, so this only
  matters for hand-made messages. Protocol v1 honours the message's ``utc`` flag.
* **Malformed bodies raise** :class:`~conveyor.core.errors.DecodeError` instead of crashing
  the consumer: a v2 body must be exactly ``[args(list), kwargs(map), embed(map|null)]``
  (a two-item body kills a real Celery worker; ours dead-letters it).
* An unknown or uninstalled ``compression`` header value is a ``DecodeError`` on the message
  (the message is what is wrong from the consumer's point of view), with the cause chained.
* Stamps travel in ``stamps``/``stamped_headers`` only; Celery 5.7 no longer copies each stamp
  to the top level of the headers, and neither do we. Top-level copies from older senders are
  not reported as extra headers.
* Exceptions are rebuilt only from modules already in ``sys.modules`` and only when the named
  object is an exception class, like Celery; but where Celery fabricates a class, we return
  :class:`~conveyor.core.errors.TaskError`, which carries the remote type name and arguments.

Thread-safety: everything here is a pure function of its arguments (plus the registry passed
in); safe from any thread.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, NamedTuple

from conveyor.core.compression import BUILTIN_METHODS, DEFAULT_MAX_SIZE, compress, decompress
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    SerializationError,
    TaskError,
)
from conveyor.core.serializers import SerializerRegistry, default_serializers
from conveyor.core.types import EXCEPTION_STATES, Envelope, GroupRecord, ResultRecord, State

__all__ = [
    "COMPRESSED_RESULT_MARKER",
    "REPR_MAXLEN",
    "REPR_MAXLEVELS",
    "TaskMessage",
    "TaskPeek",
    "build_envelope",
    "decode_meta",
    "decode_payload",
    "default_origin",
    "encode_meta",
    "exception_from_meta",
    "exception_to_meta",
    "group_from_meta",
    "group_meta",
    "meta_from_record",
    "parse_envelope",
    "peek",
    "record_from_meta",
    "result_tuple",
    "saferepr",
]

#: Celery's ``argsrepr_maxsize`` / ``kwargsrepr_maxsize``: characters (soft, see ``saferepr``).
REPR_MAXLEN = 1024
#: Celery's default ``task_repr_maxlevels``: nesting shown before ``[...]``.
REPR_MAXLEVELS = 3
#: Celery 5.7 ``result_compression`` marker: marker + MIME + ``\x00`` + compressed bytes.
COMPRESSED_RESULT_MARKER = b"\x00celery-compressed\x00"

Signature = Mapping[str, Any]
"""A Celery signature as plain data: ``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``."""

_UTC = timezone.utc
#: ``isinstance`` target: decoded payloads hold plain dicts, so test ``dict`` before the slower
#: ABC check.
_MAP = (dict, Mapping)


# ===================================================================== argsrepr / kwargsrepr
#
# Celery logs and shows ``argsrepr``/``kwargsrepr``; a reader must never parse them. We still
# produce the same text as ``celery.utils.saferepr.saferepr`` so messages are identical byte
# for byte. Its rules (observed, not copied): numbers via ``str`` (Decimal via ``repr``),
# strings in single quotes with only ``'`` escaped, bytes as ``b'<utf-8 text or hex>'``,
# containers past ``maxlevels`` as ``[...]``; output is cut once ``maxlen`` characters were
# spent: the cut value gets ``...``, then ``, ...`` and the closing brackets still open.

_OPEN, _CLOSE, _SEP, _LIT, _ATOM, _QUOTED, _KEY = range(7)
_Token = tuple[int, Any, str]


def _plain_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception as exc:  # a broken __repr__ must not break publishing
        return f"<Unrepresentable {type(obj)!r}{id(obj):#x}: {exc!r}>"


def _tokens(obj: Any, depth: int, maxlevels: int, seen: set[int]) -> Iterator[_Token]:
    if isinstance(obj, Decimal):
        yield _ATOM, repr(obj), ""
        return
    if isinstance(obj, numbers.Number):
        try:
            text = str(obj)
        except ValueError:  # an int too long to print: say so rather than fail to publish
            text = f"<{type(obj).__name__} too long to show>"
        yield _ATOM, text, ""
        return
    if isinstance(obj, (str, bytes)):
        yield _QUOTED, obj, ""
        return
    items: Any
    if isinstance(obj, (set, frozenset)):
        if not obj:
            yield _ATOM, f"{type(obj).__name__}()", ""
            return
        if type(obj) is set:
            start, end = "{", "}"
        else:
            start, end = f"{type(obj).__name__}({{", "})"
        items = obj
    elif isinstance(obj, tuple):
        start, end = "(", ",)" if len(obj) == 1 else ")"
        items = obj
    elif isinstance(obj, dict):
        start, end = "{", "}"
        items = None
    elif isinstance(obj, list):
        start, end = "[", "]"
        items = obj
    else:
        yield _ATOM, _plain_repr(obj), ""
        return
    if maxlevels and depth >= maxlevels:
        yield _LIT, f"{start}...{end}", ""
        return
    ident = id(obj)
    if ident in seen:
        yield _ATOM, f"<Recursion on {type(obj).__name__} with id={ident}>", ""
        return
    seen.add(ident)
    yield _OPEN, start, end
    if items is None:
        last = len(obj) - 1
        for i, (key, value) in enumerate(obj.items()):
            yield _KEY, key, ""
            yield _SEP, ": ", ""
            yield from _tokens(value, depth + 1, maxlevels, seen)
            if i < last:
                yield _SEP, ", ", ""
    else:
        last = len(items) - 1
        for i, value in enumerate(items):
            yield from _tokens(value, depth + 1, maxlevels, seen)
            if i < last:
                yield _SEP, ", ", ""
    seen.discard(ident)
    yield _CLOSE, end, ""


def _truncate(text: str, maxlen: int | None) -> str:
    if maxlen and len(text) >= maxlen:
        return text[:maxlen].rsplit(" ", 1)[0] + "..."
    return text


def _quote(value: str | bytes, maxlen: int | None) -> str:
    if isinstance(value, bytes):
        cut = bool(maxlen) and len(value) > (maxlen or 0)
        chunk = value[:maxlen] if cut else value
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            text = chunk.hex()
        return f"b'{text}{'...' if cut else ''}'"
    return "'" + _truncate(value, maxlen).replace("'", "\\'") + "'"


class _NotSimple(Exception):
    """Internal: the fast path cannot render this value exactly; use the general one."""


_SCALARS = (int, float, bool)
_BRACKETS: dict[type, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}")}


def _fast_repr(obj: Any, maxlen: int, maxlevels: int) -> str:
    """Render plain JSON-like data (str/int/float/bool/None in list/tuple/dict) directly.

    When the whole text is shorter than ``maxlen`` nothing is ever cut, so it equals the
    general algorithm's output; the common case (small arguments) then skips the token
    machinery. Raises :class:`_NotSimple` for anything else or once ``maxlen`` is reached.
    """
    parts: list[str] = []
    size = 0
    open_ids: set[int] = set()

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size >= maxlen:
            raise _NotSimple

    def walk(value: Any, depth: int) -> None:
        kind = type(value)
        if kind is str:
            emit("'" + value.replace("'", "\\'") + "'")
        elif kind in _SCALARS:
            try:
                text = str(value)
            except ValueError:  # an int beyond sys.get_int_max_str_digits()
                raise _NotSimple from None
            emit(text)
        elif value is None:
            emit("None")
        elif kind in _BRACKETS:
            start, end = _BRACKETS[kind]
            if kind is tuple and len(value) == 1:
                end = ",)"
            if depth >= maxlevels:
                emit(f"{start}...{end}")
                return
            if id(value) in open_ids:  # recursive structure: Celery prints a marker
                raise _NotSimple
            open_ids.add(id(value))
            emit(start)
            if kind is dict:
                for i, (key, item) in enumerate(value.items()):
                    if i:
                        emit(", ")
                    walk(key, 0)  # keys are rendered with a fresh level, like Celery
                    emit(": ")
                    walk(item, depth + 1)
            else:
                for i, item in enumerate(value):
                    if i:
                        emit(", ")
                    walk(item, depth + 1)
            open_ids.discard(id(value))
            emit(end)
        else:
            raise _NotSimple

    walk(obj, 0)
    return "".join(parts)


_REPR_SCALARS = frozenset({int, float, bool, type(None)})


def _repr_is_exact(obj: Any, depth: int, maxlevels: int) -> bool:
    """Whether the builtin ``repr(obj)`` is exactly what :func:`_fast_repr` would render.

    True for exact ints, floats, bools, None, strings that ``repr`` leaves unescaped (no
    quote, no backslash, printable), and lists, tuples and dicts of those shallower than
    ``maxlevels``. The common task arguments pass, and ``repr`` (C) is then 10-20x cheaper
    than walking them in Python.
    """
    kind = type(obj)
    if kind in _REPR_SCALARS:
        return True
    if kind is str:
        return "'" not in obj and "\\" not in obj and obj.isprintable()
    if depth >= maxlevels:
        return False
    if kind is tuple or kind is list:
        return all(_repr_is_exact(item, depth + 1, maxlevels) for item in obj)
    if kind is dict:
        return all(
            _repr_is_exact(key, 0, maxlevels) and _repr_is_exact(value, depth + 1, maxlevels)
            for key, value in obj.items()
        )
    return False


def saferepr(obj: Any, maxlen: int | None = REPR_MAXLEN, maxlevels: int = REPR_MAXLEVELS) -> str:
    """Celery's truncating ``repr`` used for the ``argsrepr``/``kwargsrepr`` headers.

    Args:
        obj: any value.
        maxlen: characters to spend before cutting (the result may exceed it by the cut
            marker and closing brackets); None for no limit.
        maxlevels: container nesting shown before ``[...]``; 0 for no limit.

    Returns:
        The same text as ``celery.utils.saferepr.saferepr(obj, maxlen, maxlevels)``.
    """
    if maxlen is not None and maxlen > 0 and maxlevels > 0:
        if _repr_is_exact(obj, 0, maxlevels):
            try:
                text = repr(obj)
            except ValueError:  # an int beyond sys.get_int_max_str_digits()
                text = None
            if text is not None and len(text) < maxlen:
                return text
        try:
            return _fast_repr(obj, maxlen, maxlevels)
        except _NotSimple:
            pass
    out: list[str] = []
    closers: list[str] = []
    remaining = maxlen
    for kind, value, end in _tokens(obj, 0, maxlevels, set()):
        if remaining is not None and remaining <= 0:
            if kind == _CLOSE:  # closing brackets are always shown, and not counted
                out.append(value)
                closers.pop()
                continue
            out.append(", ...")
            # A container reached after the limit is left out whole: its closer was never
            # pushed, so only the containers already open get closed.
            out.extend(reversed(closers))
            break
        if kind == _OPEN:
            text = value
            closers.append(end)
        elif kind == _CLOSE:
            text = value
            closers.pop()
        elif kind in (_SEP, _LIT):
            text = value
        elif kind == _ATOM:
            text = _truncate(value, remaining)
        elif kind == _QUOTED:
            text = _quote(value, remaining)
        else:  # a dict key is shown with a fresh nesting level, like Celery
            text = saferepr(value, remaining, maxlevels)
        out.append(text)
        if remaining is not None:
            remaining -= len(text)
    return "".join(out)


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


def _parse_time(value: Any, name: str, *, utc: bool = True) -> datetime | None:
    """ISO text (or a datetime a transport already decoded) -> aware datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat refuses the Z suffix
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise DecodeError(f"{name} is not an ISO-8601 time: {_brief(value)}") from exc
    else:
        raise DecodeError(f"{name} must be an ISO-8601 string, got {type(value).__name__}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        # v2: UTC (documented deviation); v1 with utc=false: the local timezone, as Celery.
        parsed = parsed.replace(tzinfo=_UTC) if utc else parsed.astimezone()
    try:
        parsed.astimezone(_UTC)  # in range once in UTC: readers compare and convert it
    except OverflowError:
        raise DecodeError(f"{name} is out of range: {_brief(value)}") from None
    return parsed


def build_envelope(
    msg: TaskMessage,
    *,
    serializer: str = "json",
    compression: str | None = None,
    serializers: SerializerRegistry | None = None,
) -> Envelope:
    """Encode ``msg`` as the protocol v2 message Celery 5.7 sends.

    Headers carry every key of celery-wire 1.2 (null when unused), then ``msg.headers``, then
    ``compression`` when compressed. The body is ``[args, kwargs, embed]``.

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


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: values from outside may be huge."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _malformed(what: str, exc: Exception) -> DecodeError:
    """The one translation of an unexpected exception while decoding into a DecodeError."""
    return DecodeError(f"malformed {what}: {type(exc).__name__}: {_brief(str(exc), 200)}")


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


# ============================================================================ result metas

_CORE_META_KEYS = frozenset(
    {"status", "result", "traceback", "children", "date_done", "task_id", "group_id", "parent_id"}
)
#: Storage-specific keys that are not part of the meta (MongoDB's document id).
_STORAGE_KEYS = frozenset({"_id"})


def result_tuple(task_id: str, parent: Any = None) -> list[Any]:
    """Celery's result tuple for one task: ``[[task_id, parent], None]``."""
    return [[task_id, parent], None]


def meta_from_record(record: ResultRecord, *, include_task_id: bool = True) -> dict[str, Any]:
    """Celery's result meta document for ``record`` (celery-wire 4.2).

    Key order follows Celery's, so JSON encodings are byte-identical: ``status``, ``result``,
    ``traceback``, ``children``, ``date_done``, then ``group_id``/``parent_id`` when set, the
    extended fields, and ``task_id`` last (Redis, memcached and rpc documents carry it; pass
    ``include_task_id=False`` for stores keyed by id).

    An exception instance as the result of an exception state is converted with
    :func:`exception_to_meta`. ``date_done`` is written in UTC (``+00:00``); a naive value
    is taken as UTC.
    """
    result = record.result
    if isinstance(result, BaseException) and record.state in EXCEPTION_STATES:
        result = exception_to_meta(result)
    done = record.date_done
    if done is not None:
        done = done.replace(tzinfo=_UTC) if done.tzinfo is None else done.astimezone(_UTC)
    meta: dict[str, Any] = {
        "status": record.state.value,
        "result": result,
        "traceback": record.traceback,
        "children": record.children,
        "date_done": done.isoformat() if done is not None else None,
    }
    if record.group_id:
        meta["group_id"] = record.group_id
    if record.parent_id:
        meta["parent_id"] = record.parent_id
    if record.extended:
        meta.update(record.extended)
    if include_task_id:
        meta["task_id"] = record.task_id
    return meta


def record_from_meta(meta: Mapping[str, Any], task_id: str | None = None) -> ResultRecord:
    """Parse a Celery result meta document.

    Args:
        meta: the decoded document.
        task_id: the id when the store keys by id (SQL column, Mongo ``_id``); otherwise
            read from ``meta["task_id"]``.

    Returns:
        The record; ``result`` stays plain data (the exception document for exception
        states), ``date_done`` aware UTC. Keys beyond the core ones (``name``, ``args``,
        ``kwargs``, ``worker``, ``retries``, ``queue``, stamps) land in ``extended``.

    Raises:
        DecodeError: not a map, unknown status, no usable task id, bad ``date_done``; any
            unexpected exception while reading is raised as one, chained.
    """
    try:
        return _record_from_meta(meta, task_id)
    except SerializationError:
        raise
    except Exception as exc:
        raise _malformed("result meta", exc) from exc


def _record_from_meta(meta: Mapping[str, Any], task_id: str | None) -> ResultRecord:
    if not isinstance(meta, Mapping):
        raise DecodeError(f"result meta must be a map, got {type(meta).__name__}")
    status = meta.get("status")
    try:
        state = State(status)
    except ValueError:
        raise DecodeError(f"unknown task state {_brief(status)} in result meta") from None
    tid = task_id if task_id is not None else meta.get("task_id", meta.get("_id"))
    if not isinstance(tid, str) or not tid:
        raise DecodeError("result meta has no task id")
    children = meta.get("children")
    if children is not None and not isinstance(children, list):
        raise DecodeError("result meta 'children' must be a list or null")
    traceback = meta.get("traceback")
    if traceback is not None and not isinstance(traceback, str):
        traceback = str(traceback)
    group_id, parent_id = meta.get("group_id"), meta.get("parent_id")
    if not isinstance(group_id, (str, type(None))) or not isinstance(parent_id, (str, type(None))):
        raise DecodeError("result meta 'group_id'/'parent_id' must be strings")
    extended = {
        k: v for k, v in meta.items() if k not in _CORE_META_KEYS and k not in _STORAGE_KEYS
    }
    done = _parse_time(meta.get("date_done"), "date_done")
    return ResultRecord(
        task_id=tid,
        state=state,
        result=meta.get("result"),
        traceback=traceback,
        date_done=done.astimezone(_UTC) if done is not None else None,
        children=children,
        group_id=group_id or None,
        parent_id=parent_id or None,
        extended=extended,
    )


def encode_meta(
    record: ResultRecord,
    serializer: str = "json",
    serializers: SerializerRegistry | None = None,
    *,
    compression: str | None = None,
    include_task_id: bool = True,
) -> bytes:
    """Serialize ``record``'s meta document as Celery's key-value backends store it.

    Args:
        record: the result.
        serializer: name or content type (Celery's ``result_serializer``).
        serializers: registry; the default one when None.
        compression: Celery 5.7 ``result_compression``: when set, the payload becomes
            :data:`COMPRESSED_RESULT_MARKER` + MIME + ``\\x00`` + compressed bytes, which
            Celery <= 5.6 cannot read.
        include_task_id: see :func:`meta_from_record`.

    Raises:
        EncodeError: the result cannot be serialized.
        ConfigurationError: unknown serializer or compression.
    """
    reg = serializers if serializers is not None else default_serializers
    body, _, _ = reg.encode(meta_from_record(record, include_task_id=include_task_id), serializer)
    if compression:
        packed, mime = compress(body, compression)
        return b"".join((COMPRESSED_RESULT_MARKER, mime.encode("ascii"), b"\x00", packed))
    return body


def decode_payload(
    data: bytes | bytearray | memoryview | str,
    serializer: str = "json",
    *,
    accept: Any = None,
    serializers: SerializerRegistry | None = None,
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept_compression: Collection[str] | str | None = BUILTIN_METHODS,
) -> Any:
    """Decode a stored payload (a result meta, a saved group) to its value.

    A payload starting with :data:`COMPRESSED_RESULT_MARKER` is decompressed first, whatever
    the reader's own compression setting (as Celery 5.7 does), never past ``max_size``.

    Args:
        data: the stored bytes (text is taken as UTF-8).
        serializer: name or content type the payload was written with.
        accept: allowed serializers; None means JSON only.
        serializers: registry; the default one when None.
        max_size: decompression limit in bytes; decoding stops there.
        accept_compression: compression methods allowed (see :func:`parse_envelope`).

    Raises:
        ContentDisallowed: ``serializer`` or the payload's compression is not accepted.
        DecodeError: corrupt or oversized payload, or an unknown compression type in it;
            any unexpected exception while decoding is raised as one, chained.
        ConfigurationError: unknown ``serializer`` (the reader's configuration, not the
            payload).
    """
    reg = serializers if serializers is not None else default_serializers
    ser = reg.get(serializer)
    reg.check_accept(ser.content_type, accept)
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if raw.startswith(COMPRESSED_RESULT_MARKER):
            mime, sep, packed = raw[len(COMPRESSED_RESULT_MARKER) :].partition(b"\x00")
            if not sep:
                raise DecodeError("compressed result payload has no compression type")
            try:
                raw = decompress(
                    packed,
                    mime.decode("ascii", "replace"),
                    max_size=max_size,
                    accept=accept_compression,
                )
            except ConfigurationError as exc:  # the payload names it: the payload's fault
                raise DecodeError(f"cannot decompress result payload: {exc}") from exc
        return reg.decode(raw, ser.content_type, ser.content_encoding, accept=accept)
    except SerializationError:
        raise
    except Exception as exc:
        raise _malformed("result payload", exc) from exc


def decode_meta(
    data: bytes | bytearray | memoryview | str,
    serializer: str = "json",
    *,
    accept: Any = None,
    serializers: SerializerRegistry | None = None,
    task_id: str | None = None,
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept_compression: Collection[str] | str | None = BUILTIN_METHODS,
) -> ResultRecord:
    """Parse a stored result payload (Redis/memcached value, SQL/Mongo ``result`` aside):
    :func:`decode_payload`, then :func:`record_from_meta`.

    Args:
        data, serializer, accept, serializers, max_size, accept_compression: as for
            :func:`decode_payload`.
        task_id: the id, when the payload lacks ``task_id``.

    Raises:
        ContentDisallowed: ``serializer`` or the payload's compression is not accepted.
        DecodeError: corrupt payload or not a result meta; any unexpected exception while
            decoding is raised as one, chained.
        ConfigurationError: unknown ``serializer`` (the reader's configuration, not the
            payload).
    """
    meta = decode_payload(
        data,
        serializer,
        accept=accept,
        serializers=serializers,
        max_size=max_size,
        accept_compression=accept_compression,
    )
    try:
        return record_from_meta(meta, task_id)
    except SerializationError:
        raise
    except Exception as exc:
        raise _malformed("result payload", exc) from exc


# ============================================================================== exceptions


def _json_safe(value: Any, reg: SerializerRegistry, serializer: str) -> bool:
    try:
        reg.encode(value, serializer)
    except SerializationError:
        return False
    return True


def exception_to_meta(
    exc: BaseException,
    *,
    serializer: str = "json",
    serializers: SerializerRegistry | None = None,
) -> dict[str, Any]:
    """Celery's exception document: ``{exc_type, exc_message, exc_module}``.

    ``exc_type`` is the class's qualified name, ``exc_message`` its ``args`` as a list, each
    argument kept if ``serializer`` can encode it and replaced by its ``repr`` otherwise
    (Celery's rule). A :class:`TaskError` (a remote exception we could not rebuild) turns
    back into the document it came from.
    """
    if isinstance(exc, TaskError):
        message = exc.exc_message
        return {
            "exc_type": exc.exc_type,
            "exc_message": list(message) if isinstance(message, tuple) else message,
            "exc_module": exc.exc_module,
        }
    reg = serializers if serializers is not None else default_serializers
    cls = type(exc)
    return {
        "exc_type": getattr(cls, "__qualname__", cls.__name__),
        "exc_message": [
            arg if _json_safe(arg, reg, serializer) else _plain_repr(arg) for arg in exc.args
        ],
        "exc_module": cls.__module__,
    }


def _loaded_exception_class(module: str, qualname: str) -> type[BaseException] | None:
    """Find ``module.qualname`` among already-imported modules, without running code.

    Only ``__dict__`` entries are read (no ``getattr``), so module ``__getattr__`` hooks,
    lazy importers and properties never fire.
    """
    obj: Any = sys.modules.get(module)
    if obj is None:
        return None
    for part in qualname.split("."):
        try:
            namespace = vars(obj)
        except TypeError:
            return None
        obj = namespace.get(part)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def exception_from_meta(meta: Mapping[str, Any], *, traceback: str | None = None) -> BaseException:
    """Rebuild an exception from Celery's exception document.

    The class is looked up only in modules already imported (``sys.modules``; nothing is
    imported) by walking the dotted ``exc_type``, and must be a ``BaseException`` subclass.
    A list ``exc_message`` is splatted into the constructor, anything else passed as the one
    argument. When the class is not found, is not an exception, or its constructor fails,
    the result is a :class:`TaskError` carrying the remote type, module and arguments.

    Args:
        meta: ``{"exc_type", "exc_message", "exc_module"}``.
        traceback: remote traceback text, attached to a returned ``TaskError``.

    Raises:
        DecodeError: ``meta`` is not a map or has no ``exc_type`` string.
    """
    if not isinstance(meta, Mapping):
        raise DecodeError(f"exception meta must be a map, got {type(meta).__name__}")
    exc_type = meta.get("exc_type")
    if not isinstance(exc_type, str) or not exc_type:
        raise DecodeError("exception meta has no 'exc_type'")
    exc_module = meta.get("exc_module")
    if not isinstance(exc_module, str):
        exc_module = None
    message = meta.get("exc_message", "")
    cls = _loaded_exception_class(exc_module, exc_type) if exc_module else None
    if cls is not None:
        try:
            return cls(*message) if isinstance(message, (list, tuple)) else cls(message)
        except Exception:  # noqa: S110 - a constructor with another signature: fall through
            pass
    return TaskError(exc_type, message, exc_module, traceback)


# ================================================================================== groups


def group_meta(group_id: str, task_ids: Sequence[str]) -> dict[str, Any]:
    """Celery's saved-group document: ``{"result": [[gid, None], [<result tuples>]]}``."""
    return {"result": [[group_id, None], [result_tuple(t) for t in task_ids]]}


def group_from_meta(meta: Any, group_id: str | None = None) -> GroupRecord:
    """Parse a saved group: Celery's tuple document, a bare group tuple, or a list of ids.

    Args:
        meta: ``{"result": [[gid, parent], [members...]]}`` (Redis, memcached, SQL 5.7),
            the bare tuple, or a list of task ids (MongoDB); a ``date_done`` key is read when
            present.
        group_id: the id for shapes that do not carry it (the MongoDB list).

    Raises:
        DecodeError: none of these shapes, or no group id; any unexpected exception while
            reading is raised as one, chained.
    """
    try:
        return _group_from_meta(meta, group_id)
    except SerializationError:
        raise
    except Exception as exc:
        raise _malformed("group result", exc) from exc


def _group_from_meta(meta: Any, group_id: str | None) -> GroupRecord:
    done = None
    result = meta
    if isinstance(meta, Mapping):
        done = _parse_time(meta.get("date_done"), "date_done")
        result = meta.get("result")
    try:
        if isinstance(result, list) and all(isinstance(t, str) for t in result):
            ids = tuple(result)
            gid = group_id
        else:
            (gid, _parent), members = result
            ids = tuple(_member_id(m) for m in members)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not a Celery group result: {exc}") from None
    if not isinstance(gid, str) or not gid:
        raise DecodeError("group result has no group id")
    return GroupRecord(group_id=gid, task_ids=ids, date_done=done)


def _member_id(member: Any) -> str:
    (task_id, _parent), _children = member
    if not isinstance(task_id, str):
        raise ValueError(f"member id must be a string, got {task_id!r}")
    return task_id

"""Celery result metas: records to and from Celery's result document, its serialized and
compressed forms, exception documents, and group/chord result layouts.

Part of :mod:`conveyor.core.celery`; import the names from there. The wire rules it follows
is ``docs/celery-compat.md`` (#result-meta-document).

Thread-safety: pure functions of their arguments (plus the registry passed in); safe from any
thread.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from conveyor.core.celery._common import _UTC, _brief, _malformed, _parse_time
from conveyor.core.celery.saferepr import _plain_repr
from conveyor.core.compression import BUILTIN_METHODS, DEFAULT_MAX_SIZE, compress, decompress
from conveyor.core.errors import ConfigurationError, DecodeError, SerializationError, TaskError
from conveyor.core.serializers import SerializerRegistry, default_serializers
from conveyor.core.types import EXCEPTION_STATES, GroupRecord, ResultRecord, State

__all__ = [
    "COMPRESSED_RESULT_MARKER",
    "celery_key_prefix",
    "decode_meta",
    "decode_payload",
    "encode_meta",
    "exception_from_meta",
    "exception_to_meta",
    "group_from_meta",
    "group_meta",
    "meta_from_record",
    "record_from_meta",
    "result_tuple",
]

#: Celery 5.7 ``result_compression`` marker: marker + MIME + ``\x00`` + compressed bytes.
COMPRESSED_RESULT_MARKER = b"\x00celery-compressed\x00"


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
    """Celery's result meta document for ``record`` (docs/celery-compat.md#result-meta-document).

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


def celery_key_prefix(prefix: str) -> str:
    """Celery's rule for a result backend's ``global_keyprefix`` (Redis, memcached): add
    ``_`` unless the prefix is empty or already ends in ``:``, ``_``, ``-`` or ``.``."""
    if not prefix or prefix[-1] in ":_-.":
        return prefix
    return prefix + "_"

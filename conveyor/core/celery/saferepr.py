"""Celery's truncating ``repr`` for the ``argsrepr``/``kwargsrepr`` headers.

Part of :mod:`conveyor.core.celery` (the Celery 5.x wire formats); import the names from
there.

Thread-safety: pure functions; safe from any thread.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

__all__ = ["REPR_MAXLEN", "REPR_MAXLEVELS", "saferepr"]

#: Celery's ``argsrepr_maxsize`` / ``kwargsrepr_maxsize``: characters (soft, see ``saferepr``).
REPR_MAXLEN = 1024
#: Celery's default ``task_repr_maxlevels``: nesting shown before ``[...]``.
REPR_MAXLEVELS = 3


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

"""Decoding helpers shared by the message and the result-meta readers of
:mod:`conveyor.core.celery` (private to the package).

Thread-safety: pure functions; safe from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from conveyor.core.errors import DecodeError

_UTC = timezone.utc
#: ``isinstance`` target: decoded payloads hold plain dicts, so test ``dict`` before the slower
#: ABC check.
_MAP = (dict, Mapping)


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

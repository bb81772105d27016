"""Typed, frozen option objects built from URL query strings and keyword arguments.

Each implementation declares its options as a frozen dataclass. :func:`build_options` fills
it with precedence *keyword > URL query > default*, converts query strings to the field's
type, and fails loudly on unknown names with a did-you-mean, so a typo such as
``?visibilty_timeout=10`` is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from conveyor.core.errors import ConfigurationError

__all__ = ["build_options", "closest", "parse_bool", "parse_seconds"]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def closest(word: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate most like ``word``, or None if none is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true/false)")


def parse_seconds(value: str | float | int) -> float:
    """Seconds as float; accepts ``"1.5"``, ``"250ms"``, ``"2s"``, ``"3m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration cannot be a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        factor = 1.0
        for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if text.endswith(suffix):
                text, factor = text[: -len(suffix)], mult
                break
        seconds = float(text) * factor
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{value!r} is not a non-negative duration")
    return seconds


def _convert(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in args:
            return None
        return _convert(value, non_none[0], name) if len(non_none) == 1 else value
    if not isinstance(value, str):
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        return value
    if annotation is bool:
        return parse_bool(value)
    if annotation is int:
        return int(value)
    if annotation is float:
        return (
            parse_seconds(value)
            if name.endswith(("timeout", "seconds", "interval"))
            else (float(value))
        )
    if origin is tuple:
        return tuple(p for p in (s.strip() for s in value.split(",")) if p)
    return value


def _why(key: str, exc: Exception) -> str:
    """The reason a value was refused, never showing a secret: the conversion error names
    the value (``invalid literal for int(): 'hunter2'``)."""
    from conveyor.core.urls import is_secret_key, mask_text

    if is_secret_key(key):
        return f"{type(exc).__name__} (the value is not shown: {key!r} names a secret)"
    return mask_text(str(exc))


def build_options(
    cls: type[T],
    query: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    owner: str = "",
    ignore: typing.Collection[str] = (),
) -> T:
    """Build an options dataclass ``cls`` with precedence overrides > query > defaults.

    Args:
        cls: a dataclass whose fields are the accepted option names.
        query: URL query parameters (strings, converted to the field types).
        overrides: keyword arguments (taken as given; strings are converted like the query).
        owner: name used in error messages (``"redis broker"``).
        ignore: query keys consumed elsewhere (for example by the driver) and not options.

    Raises:
        ConfigurationError: unknown option (with a did-you-mean) or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):  # pragma: no cover - programming error
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for source in (query or {}), (overrides or {}):
        for key, raw in source.items():
            if key in ignore:
                continue
            if key not in names:
                hint = closest(key, names)
                did = f" Did you mean {hint!r}?" if hint else ""
                raise ConfigurationError(
                    f"unknown option {key!r} for {owner or cls.__name__}.{did} "
                    f"Known options: {', '.join(sorted(names))}."
                )
            try:
                values[key] = _convert(raw, hints[key], key)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ConfigurationError(
                    f"bad value for option {key!r} of {owner or cls.__name__}: {_why(key, exc)}"
                ) from None
    return cls(**values)

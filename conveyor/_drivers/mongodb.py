"""MongoDB client plumbing shared by the MongoDB broker (:mod:`conveyor.transports.mongodb`)
and result backend (:mod:`conveyor.backends.mongodb`). Private.

URL splitting (conveyor's options out, pymongo's URI options checked against pymongo's own
table), the client keywords conveyor's timeouts become (:func:`driver_defaults`),
:func:`connect`, and error translation in ONE place: :func:`translate_error` and
:func:`translating` (the spelling every driver module shares, see :mod:`conveyor._drivers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from bson.errors import BSONError, InvalidBSON
from pymongo import MongoClient
from pymongo import errors as mongo_errors
from pymongo.uri_parser import split_options

from conveyor._drivers import translating as _translating
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    EncodeError,
    InvalidURL,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import closest
from conveyor.core.urls import mask_text, mask_url, parse_url

__all__ = [
    "DRIVER_ERRORS",
    "MONGODB_SCHEMES",
    "connect",
    "driver_defaults",
    "driver_option_names",
    "split_mongodb_url",
    "translate_error",
    "translating",
]

#: URL schemes served by the MongoDB broker and result backend.
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")

# OperationFailure codes: auth and permission problems, index conflicts, server time limits.
_CONFIG_CODES = frozenset({13, 18, 85, 86, 8000})  # Unauthorized, AuthFailed, index clash
_TIMEOUT_CODES = frozenset({50, 262})  # MaxTimeMSExpired, ExceededTimeLimit


def split_mongodb_url(url: str, option_names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Split conveyor's options out of a MongoDB URL; everything else stays as written.

    Only the ``key=value`` items of the query whose key is one of ``option_names`` are
    removed (their values percent-decoded); every other character of the URL reaches
    pymongo unchanged (``replicaSet``, ``readPreferenceTags``, commas in host lists...).

    Returns:
        ``(driver_url, conveyor_options)``.

    Raises:
        InvalidURL: not a ``mongodb://`` or ``mongodb+srv://`` URL, or no host.
        ConfigurationError: a query key is neither one of ``option_names`` nor a MongoDB URI
            option (pymongo itself would only warn), or a driver option has a bad value.
    """
    parsed = parse_url(url)  # validates scheme, hosts and ports; masks passwords in errors
    if parsed.scheme not in MONGODB_SCHEMES:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a MongoDB URL: use 'mongodb://host:27017/database' "
            "or 'mongodb+srv://cluster.example.net/database'"
        )
    if not parsed.hosts:
        raise InvalidURL(f"{mask_url(url)!r} names no host")
    text = url.strip()
    head, sep, query = text.partition("?")
    if not sep:
        return text, {}
    names = frozenset(option_names)
    delimiter = ";" if "&" not in query and ";" in query else "&"
    kept: list[str] = []
    ours: dict[str, str] = {}
    for item in query.split(delimiter):
        if not item:
            continue
        key, _, value = item.partition("=")
        name = unquote_plus(key)
        if name in names:
            ours[name] = unquote_plus(value)  # a repeated key: the last one wins
        else:
            kept.append(item)
    driver_url = f"{head}?{delimiter.join(kept)}" if kept else head
    _check_driver_options(url, delimiter.join(kept), names)
    return driver_url, ours


def driver_option_names() -> frozenset[str] | None:
    """The URI options pymongo knows, lower-cased, from its own tables
    (``pymongo.common.URI_OPTIONS_VALIDATOR_MAP`` plus aliases and deprecated spellings; older
    releases: ``VALIDATORS``). None if this pymongo has neither."""
    from pymongo import common

    table = getattr(common, "URI_OPTIONS_VALIDATOR_MAP", None)
    if not isinstance(table, Mapping):
        table = getattr(common, "VALIDATORS", None)
    if not isinstance(table, Mapping) or not table:
        return None
    names = {str(k).lower() for k in table}
    for extra in ("URI_OPTIONS_ALIAS_MAP", "URI_OPTIONS_DEPRECATION_MAP"):
        more = getattr(common, extra, None)
        if isinstance(more, Mapping):
            names.update(str(k).lower() for k in more)
    return frozenset(names)


def _check_driver_options(url: str, query: str, names: frozenset[str]) -> None:
    """Refuse query keys that are neither conveyor's nor the driver's (pymongo would only
    warn and ignore them, so a typo such as ``lease_secnds`` would pass silently).

    Keys are checked against pymongo's own table of URI options, never by reading its error
    text (pymongo 4.20 stopped naming the unknown key there). Values are then validated by
    pymongo itself. Without a table (a pymongo that has none), each key is tried alone with
    pymongo's parser, so the error still names the right key.
    """
    if not query:
        return
    delimiter = ";" if "&" not in query and ";" in query else "&"
    items = [item for item in query.split(delimiter) if item]
    known = driver_option_names()
    for item in items:
        key = unquote_plus(item.partition("=")[0])
        if known is not None:
            unknown = key.lower() not in known
        else:
            try:
                split_options(item, validate=True, warn=False)
                unknown = False
            except mongo_errors.ConfigurationError:
                unknown = True  # or a bad value: the suggestion below tells which is likely
            except (ValueError, TypeError):
                unknown = False  # a bad value; reported by the whole-query check below
        if unknown:
            hint = closest(key, names) or closest(key.lower(), known or ())
            did = f" Did you mean {hint!r}?" if hint else ""
            raise ConfigurationError(
                f"{mask_url(url)!r}: unknown option {mask_url(key)[:100]!r}.{did} conveyor "
                f"options: {', '.join(sorted(names))}; any other key must be a MongoDB URI "
                "option"
            )
    try:
        split_options(query, validate=True, warn=False)
    except (mongo_errors.ConfigurationError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"{mask_url(url)!r}: {mask_text(str(exc))}") from None


def driver_defaults(
    driver_url: str,
    *,
    connect_timeout: float | None,
    server_selection_timeout: float | None,
    operation_timeout: float | None,
) -> dict[str, Any]:
    """Keyword arguments for :class:`pymongo.MongoClient` that the URL does not set itself.

    PyMongo lets keywords override URL options, so a default is only passed when the URL
    (case-insensitively, as pymongo reads it) has no value of its own.
    """
    query = driver_url.partition("?")[2]
    present = {
        unquote_plus(item.partition("=")[0]).lower()
        for item in query.replace(";", "&").split("&")
        if item
    }
    kwargs: dict[str, Any] = {}
    if "appname" not in present:
        kwargs["appname"] = "conveyor"
    if connect_timeout is not None and "connecttimeoutms" not in present:
        kwargs["connectTimeoutMS"] = max(1, round(connect_timeout * 1000))
    if server_selection_timeout is not None and "serverselectiontimeoutms" not in present:
        kwargs["serverSelectionTimeoutMS"] = max(1, round(server_selection_timeout * 1000))
    if (
        operation_timeout is not None
        and "sockettimeoutms" not in present
        and "timeoutms" not in present
    ):
        kwargs["socketTimeoutMS"] = max(1, round(operation_timeout * 1000))
    return kwargs


def translate_error(exc: BaseException, *, what: str, url: str) -> ConveyorError:
    """The ONE mapping from PyMongo/BSON errors to conveyor's tree (broker and backend).

    * server unreachable (``ServerSelectionTimeoutError``), dropped connections, primary
      changes (``AutoReconnect``, ``NotPrimaryError``, ``ConnectionFailure``), a closed client
      (``InvalidOperation``) -> :class:`ConnectionLost`;
    * socket or server time limits (``NetworkTimeout``, ``ExecutionTimeout``,
      ``WTimeoutError``, CSOT timeouts) -> :class:`OperationTimeout`;
    * documents BSON cannot hold or that exceed 16 MiB, text that is not valid Unicode
      (``UnicodeEncodeError``) -> :class:`EncodeError`;
    * stored documents that cannot be read (``InvalidBSON``: a date out of range, bad
      UTF-8; ``UnicodeDecodeError``) -> :class:`DecodeError`;
    * bad URI or client options, authentication and permission failures, index conflicts
      -> :class:`ConfigurationError` (:class:`InvalidURL` for the URI);
    * any other server error -> :class:`OperationalError`.

    Classified by exception class and server error code, never by message text. The
    message names the operation, the masked URL and the driver's first line (never a
    password: every text goes through :func:`mask_text`). Callers chain it:
    ``raise translate_error(exc, ...) from exc``.
    """
    where = f"{what} on {mask_url(url)}"
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    detail = mask_text(first) or type(exc).__name__
    if isinstance(exc, mongo_errors.ServerSelectionTimeoutError):
        return ConnectionLost(f"{where}: no server reachable: {detail}")
    timeouts = (
        mongo_errors.NetworkTimeout,
        mongo_errors.ExecutionTimeout,
        mongo_errors.WTimeoutError,
    )
    if isinstance(exc, timeouts):
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, mongo_errors.PyMongoError) and exc.timeout:
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, mongo_errors.ConnectionFailure):  # AutoReconnect, NotPrimaryError, ...
        return ConnectionLost(f"{where}: connection lost: {detail}")
    if isinstance(exc, mongo_errors.InvalidOperation):
        return ConnectionLost(f"{where}: the client is closed: {detail}")
    if isinstance(exc, InvalidBSON | UnicodeDecodeError):  # reading, not storing
        return DecodeError(f"{where}: a stored document cannot be read: {detail}")
    if isinstance(exc, UnicodeEncodeError):  # BSON strings are UTF-8: a lone surrogate
        return EncodeError(f"{where}: BSON cannot hold the text: {detail}")
    if isinstance(exc, BSONError | mongo_errors.DocumentTooLarge | OverflowError):
        return EncodeError(f"{where}: the document cannot be stored: {detail}")
    if isinstance(exc, mongo_errors.InvalidURI):
        return InvalidURL(f"{where}: {detail}")
    if isinstance(exc, mongo_errors.ConfigurationError):
        return ConfigurationError(f"{where}: {detail}")
    if isinstance(exc, mongo_errors.OperationFailure):
        code = exc.code
        if code in _TIMEOUT_CODES:
            return OperationTimeout(f"{where}: timed out: {detail}")
        if code in _CONFIG_CODES:
            return ConfigurationError(f"{where}: {detail} (code {code})")
        return OperationalError(f"{where}: {detail} (code {code})")
    return OperationalError(f"{where}: {detail}")


#: What a driver call may raise that :func:`translate_error` maps (``UnicodeError``: BSON
#: encodes and decodes strings as UTF-8).
DRIVER_ERRORS = (mongo_errors.PyMongoError, BSONError, OverflowError, UnicodeError)


def translating(
    what: str, url: str, *, closed: Any = None
) -> contextlib.AbstractContextManager[None]:
    """Raise :func:`translate_error`'s error (the cause chained) from any driver exception
    (:data:`DRIVER_ERRORS`) raised inside; conveyor's own errors pass through. ``closed``:
    see :func:`conveyor._drivers.translating`."""
    return _translating(DRIVER_ERRORS, translate_error, what=what, url=url, closed=closed)


def connect(
    driver_url: str,
    url: str,
    *,
    connect_timeout: float | None,
    server_selection_timeout: float | None,
    operation_timeout: float | None,
) -> MongoClient[dict[str, Any]]:
    """A long-lived :class:`pymongo.MongoClient` for ``driver_url`` (``url`` without
    conveyor's options), with :func:`driver_defaults`. Does not wait for the server.

    Raises:
        InvalidURL, ConfigurationError: pymongo rejects the URI or an option (masked).
    """
    kwargs = driver_defaults(
        driver_url,
        connect_timeout=connect_timeout,
        server_selection_timeout=server_selection_timeout,
        operation_timeout=operation_timeout,
    )
    try:
        return MongoClient(driver_url, **kwargs)
    except mongo_errors.PyMongoError as exc:
        raise translate_error(exc, what="create client", url=url) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"bad MongoDB URL {mask_url(url)!r}: {mask_text(str(exc))}"
        ) from None

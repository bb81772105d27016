"""SQL URLs: ``sqla+<url>`` / ``db+<url>`` split into the SQLAlchemy URL and conveyor's
options (conveyor's keys are removed from the query; driver keys pass through untouched, and
a key that is neither is refused with a did-you-mean)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from conveyor._drivers.sql.errors import _masked
from conveyor.core.errors import ConfigurationError, InvalidURL
from conveyor.core.options import closest
from conveyor.core.urls import mask_url, refuse_ambiguous_credentials

__all__ = ["driver_query_keys", "split_url"]


def split_url(
    url: str, *, prefixes: Collection[str], option_names: Collection[str]
) -> tuple[URL, dict[str, str]]:
    """Split ``sqla+postgresql+psycopg://u:p@h/db?lease_seconds=5&sslmode=require``.

    Returns the SQLAlchemy URL without conveyor's option keys and the option keys found.
    A URL without one of ``prefixes`` is taken as a plain SQLAlchemy URL.

    Raises:
        InvalidURL: the remainder is not a SQLAlchemy URL.
    """
    text = url.strip()
    head, plus, rest = text.partition("+")
    inner = rest if plus and head.lower() in prefixes else text
    # A raw '?' or '#' in credentials reads differently in SQLAlchemy than here: refuse it
    # before SQLAlchemy parses it (and quotes a piece of the password as a host).
    refuse_ambiguous_credentials(url)
    try:
        sa_url = make_url(inner)
    except (sa_exc.ArgumentError, ValueError) as exc:  # ValueError: a non-numeric port
        raise InvalidURL(
            f"{mask_url(url)!r} is not a SQLAlchemy URL: {_masked(exc, url)}"
        ) from None
    ours: dict[str, str] = {}
    for key, value in sa_url.query.items():
        if key in option_names:
            # A repeated key arrives as a tuple; the last one wins, as everywhere in conveyor.
            ours[key] = value[-1] if isinstance(value, tuple) else value
    if ours:
        sa_url = sa_url.difference_update_query(list(ours))
    _check_driver_keys(sa_url, url, option_names)
    return sa_url, ours


# SQLAlchemy's own query keys: ``plugin`` (every dialect), the ``ssl_*`` keys its MySQL
# dialects turn into the driver's ``ssl`` dict, and pysqlite's connect arguments and the SQLite
# URI parameters it passes on with ``uri=true`` (sqlalchemy/dialects/sqlite/pysqlite.py).
_SA_KEYS = frozenset({"plugin"})
_SA_MYSQL_SSL = frozenset(
    {"ssl_ca", "ssl_key", "ssl_cert", "ssl_capath", "ssl_cipher", "ssl_check_hostname"}
)
_PYSQLITE_KEYS = frozenset(
    {"uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
_SQLITE_URI_KEYS = frozenset({"vfs", "mode", "cache", "psow", "nolock", "immutable", "modeof"})


def driver_query_keys(sa_url: URL) -> frozenset[str] | None:
    """The URL query keys the URL's driver accepts, read from the driver's own table of
    connection options (libpq's ``PQconndefaults`` through psycopg 3, PyMySQL's ``connect``
    signature, pysqlite's documented arguments), plus SQLAlchemy's own keys. ``None`` when
    the driver has no such table (other drivers): their keys pass through unchecked."""
    try:
        backend, driver = sa_url.get_backend_name(), sa_url.get_driver_name()
    except Exception:  # an unknown dialect: make_database reports it
        return None
    keys: set[str] = set()
    try:
        if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
            import psycopg  # psycopg2 has no such table; psycopg 3 reads libpq's

            keys = {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()}
        elif backend in ("mysql", "mariadb") and driver == "pymysql":
            pymysql = importlib.import_module("pymysql.connections")  # no type stubs
            signature = inspect.signature(pymysql.Connection.__init__)
            named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            keys = {n for n, p in signature.parameters.items() if p.kind in named}
            keys |= _SA_MYSQL_SSL
        elif backend == "sqlite" and driver == "pysqlite":
            keys = set(_PYSQLITE_KEYS)
            if str(sa_url.query.get("uri", "")).lower() in ("1", "true", "yes", "on"):
                keys |= _SQLITE_URI_KEYS
        else:
            return None
    except Exception:  # the driver is missing or changed shape: do not guess
        return None
    keys.discard("self")
    return frozenset(keys | _SA_KEYS) if keys else None


def _check_driver_keys(sa_url: URL, url: str, option_names: Collection[str]) -> None:
    """Refuse query keys that are neither conveyor's options nor the driver's (a typo such as
    ``lease_secnds`` would otherwise reach the driver: a raw ``TypeError`` from PyMySQL at
    the first connect, an error at the first query on PostgreSQL, silence on SQLite)."""
    if not sa_url.query:
        return
    known = driver_query_keys(sa_url)
    if known is None:
        return
    for key in sa_url.query:
        if key in known:
            continue
        hint = closest(key, option_names) or closest(key, known)
        did = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigurationError(
            f"unknown option {key!r} in {mask_url(url)!r}.{did} conveyor options: "
            f"{', '.join(sorted(option_names))}; any other key must be a connection option "
            f"of the {sa_url.get_driver_name()} driver"
        )

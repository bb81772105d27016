"""Scheme registry: which class serves which URL scheme.

Built-ins are a lazy table ``scheme -> "module:Class"`` (nothing is imported until used);
third parties add schemes through the entry-point groups ``conveyor.brokers`` and
``conveyor.result_backends`` (scanned once, on the first scheme the table does not know), or
with :meth:`Registry.register` in tests. A built-in is never replaced by an entry point, and
``register`` refuses to replace one unless told ``replace=True``.

Lookup matches the whole scheme first (``mongodb+srv``, ``cache+memcached``,
``redis+socket``), then the part before the first ``+`` for prefix schemes whose remainder
is another URL (``sqla+postgresql+psycopg://``, ``db+sqlite://``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.core.errors import ConfigurationError, MissingDependency, UnknownScheme
from conveyor.core.options import closest
from conveyor.core.protocols import Broker, ResultBackend
from conveyor.core.urls import mask_url, scheme_of

__all__ = [
    "BROKER_GROUP",
    "RESULT_BACKEND_GROUP",
    "Registry",
    "broker_from_url",
    "default_registry",
    "result_backend_from_url",
]

log = logging.getLogger("conveyor.registry")

BROKER_GROUP = "conveyor.brokers"
RESULT_BACKEND_GROUP = "conveyor.result_backends"
Kind = Literal["broker", "result_backend"]


@dataclass(frozen=True)
class Entry:
    """One registered scheme.

    Attributes:
        target: ``"module:Class"`` or the class itself.
        extra: the ``conveyor[extra]`` that installs the driver, if any.
        requires: the driver's import name, checked before importing ``target``.
        prefix: True when the scheme is a prefix whose remainder is another URL's scheme
            (``sqla+postgresql``).
        builtin: shipped with conveyor.
        refusal: when set, this scheme is known but refused for this kind, with this reason.
    """

    target: str | type[Any] | None
    extra: str | None = None
    requires: str | None = None
    prefix: bool = False
    builtin: bool = False
    refusal: str | None = None


def _b(target: str, extra: str | None = None, requires: str | None = None) -> Entry:
    return Entry(target, extra, requires, builtin=True)


def _prefix(target: str, extra: str, requires: str) -> Entry:
    return Entry(target, extra, requires, prefix=True, builtin=True)


def _refuse(reason: str, *, prefix: bool = False) -> Entry:
    return Entry(None, prefix=prefix, builtin=True, refusal=reason)


_REDIS_B = "conveyor.transports.redis:RedisBroker"
_AMQP_B = "conveyor.transports.amqp:AMQPBroker"
_MONGO_B = "conveyor.transports.mongodb:MongoDBBroker"
_REDIS_R = "conveyor.backends.redis:RedisResultBackend"
_MONGO_R = "conveyor.backends.mongodb:MongoDBResultBackend"
_MEMCACHED_R = "conveyor.backends.memcached:MemcachedResultBackend"
_MEMORY_R = "conveyor.backends.memory:MemoryResultBackend"
_SQL_R = "conveyor.backends.sqlalchemy:SQLAlchemyResultBackend"
_SQL_B = "conveyor.transports.sqlalchemy:SQLAlchemyBroker"

_NOT_A_BROKER_CACHE = (
    "memcached cannot be a broker: it evicts entries under memory pressure and has no queue "
    "primitive, so messages would be lost. Use it as a result backend "
    "(result_backend='cache+memcached://host:11211/') with a broker such as redis:// or "
    "sqla+sqlite:///conveyor.db"
)
_BUILTIN_BROKERS: dict[str, Entry] = {
    "memory": _b("conveyor.transports.memory:MemoryBroker"),
    "redis": _b(_REDIS_B, "redis", "redis"),
    "rediss": _b(_REDIS_B, "redis", "redis"),
    "redis+socket": _b(_REDIS_B, "redis", "redis"),
    "sentinel": _b(_REDIS_B, "redis", "redis"),
    "amqp": _b(_AMQP_B, "amqp", "pika"),
    "amqps": _b(_AMQP_B, "amqp", "pika"),
    "pyamqp": _b(_AMQP_B, "amqp", "pika"),
    "mongodb": _b(_MONGO_B, "mongodb", "pymongo"),
    "mongodb+srv": _b(_MONGO_B, "mongodb", "pymongo"),
    "sqla": _prefix(_SQL_B, "sqlalchemy", "sqlalchemy"),
    "sqlalchemy": _prefix(_SQL_B, "sqlalchemy", "sqlalchemy"),
    "cache": _refuse(_NOT_A_BROKER_CACHE, prefix=True),
    "memcached": _refuse(_NOT_A_BROKER_CACHE),
    "rpc": _refuse(
        "rpc:// is a result backend (replies over AMQP), not a broker; "
        "use broker_url='amqp://...' with result_backend='rpc://'"
    ),
    "db": _refuse(
        "db+ is Celery's spelling for the SQL *result backend*; the SQL broker is "
        "'sqla+<sqlalchemy url>', e.g. 'sqla+sqlite:///conveyor.db'",
        prefix=True,
    ),
    "database": _refuse("use 'sqla+<sqlalchemy url>' for the SQL broker", prefix=True),
}
_BUILTIN_BACKENDS: dict[str, Entry] = {
    "memory": _b(_MEMORY_R),
    "cache+memory": _b(_MEMORY_R),
    "redis": _b(_REDIS_R, "redis", "redis"),
    "rediss": _b(_REDIS_R, "redis", "redis"),
    "redis+socket": _b(_REDIS_R, "redis", "redis"),
    "sentinel": _b(_REDIS_R, "redis", "redis"),
    "rpc": _b("conveyor.backends.rpc:RPCResultBackend", "amqp", "pika"),
    "mongodb": _b(_MONGO_R, "mongodb", "pymongo"),
    "mongodb+srv": _b(_MONGO_R, "mongodb", "pymongo"),
    "cache+memcached": _b(_MEMCACHED_R, "memcached", "pymemcache"),
    "memcached": _b(_MEMCACHED_R, "memcached", "pymemcache"),
    "db": _prefix(_SQL_R, "sqlalchemy", "sqlalchemy"),
    "database": _prefix(_SQL_R, "sqlalchemy", "sqlalchemy"),
    "sqla": _refuse(
        "sqla+ is the SQL *broker* scheme; the SQL result backend is "
        "'db+<sqlalchemy url>', e.g. 'db+sqlite:///results.db'",
        prefix=True,
    ),
    "amqp": _refuse(
        "amqp:// is no longer a result backend in Celery 5 or conveyor; use 'rpc://' for "
        "replies over the AMQP broker"
    ),
}


class Registry:
    """Maps URL schemes to implementation classes for brokers and result backends.

    Thread-safe. The module-level :data:`default_registry` serves ``broker_from_url`` and
    ``result_backend_from_url``; pass ``registry=`` to use another (tests, isolation).

    Args:
        load_entry_points: scan the entry-point groups on the first unknown scheme.
    """

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._tables: dict[str, dict[str, Entry]] = {
            "broker": dict(_BUILTIN_BROKERS),
            "result_backend": dict(_BUILTIN_BACKENDS),
        }
        self._load_entry_points = load_entry_points
        self._scanned = False
        self._lock = threading.RLock()

    # ---- registration
    def register(
        self,
        kind: Kind,
        scheme: str,
        target: str | type[Any],
        *,
        extra: str | None = None,
        requires: str | None = None,
        prefix: bool = False,
        replace: bool = False,
    ) -> None:
        """Register ``target`` (a class or ``"module:Class"``) for ``scheme``.

        Raises:
            ConfigurationError: ``scheme`` is a built-in (or already registered) and
                ``replace`` is False.
        """
        scheme = scheme.lower()
        with self._lock:
            table = self._table(kind)
            existing = table.get(scheme)
            if existing is not None and not replace:
                what = "built-in" if existing.builtin else "registered"
                raise ConfigurationError(
                    f"{kind} scheme {scheme!r} is already {what}; pass replace=True to replace it"
                )
            table[scheme] = Entry(target, extra, requires, prefix=prefix)

    def unregister(self, kind: Kind, scheme: str) -> None:
        """Remove a scheme registered with :meth:`register` (built-ins come back)."""
        with self._lock:
            table = self._table(kind)
            table.pop(scheme.lower(), None)
            builtins = _BUILTIN_BROKERS if kind == "broker" else _BUILTIN_BACKENDS
            if scheme.lower() in builtins:
                table[scheme.lower()] = builtins[scheme.lower()]

    def schemes(self, kind: Kind) -> list[str]:
        """Known schemes for ``kind`` (refused ones excluded), prefix schemes shown as
        ``sqla+<url>``."""
        self._scan_entry_points()
        with self._lock:
            return sorted(
                f"{name}+<url>" if entry.prefix else name
                for name, entry in self._table(kind).items()
                if entry.refusal is None
            )

    # ---- lookup
    def lookup(self, kind: Kind, url: str) -> type[Any]:
        """Return the class serving ``url``'s scheme for ``kind``, importing it if needed.

        Raises:
            InvalidURL: empty or scheme-less URL.
            UnknownScheme: no such scheme, with a did-you-mean and the known list.
            MissingDependency: the scheme's driver is not installed.
            ConfigurationError: the scheme is known but refused for this kind (with why).
        """
        scheme = scheme_of(url)
        entry, name = self._find(kind, scheme)
        if entry is None:
            self._scan_entry_points()
            entry, name = self._find(kind, scheme)
        if entry is None:
            raise self._unknown(kind, scheme)
        if entry.refusal is not None:
            raise ConfigurationError(f"{mask_url(url)!r}: {entry.refusal}")
        return self._load(entry, name)

    def _find(self, kind: Kind, scheme: str) -> tuple[Entry | None, str]:
        with self._lock:
            table = self._table(kind)
            if scheme in table and not table[scheme].prefix:
                return table[scheme], scheme
            head, plus, rest = scheme.partition("+")
            if plus and rest and head in table and table[head].prefix:
                return table[head], head
            if scheme in table and table[scheme].prefix:
                # 'sqla://' alone: a prefix scheme needs an inner URL scheme.
                return None, scheme
            return None, scheme

    def _unknown(self, kind: Kind, scheme: str) -> UnknownScheme:
        with self._lock:
            names = [n for n, e in self._table(kind).items() if e.refusal is None]
        known = self.schemes(kind)
        head = scheme.partition("+")[0]
        suggestion = closest(scheme, names) or closest(head, names)
        if suggestion is not None and self._table(kind)[suggestion].prefix:
            inner = scheme.partition("+")[2] or "sqlite"
            suggestion = f"{suggestion}+{inner}"
        if suggestion is None and "+" not in scheme:
            # 'postgresql://' for a broker: the SQL prefixes wrap any SQLAlchemy URL.
            with self._lock:
                prefixes = [n for n, e in self._table(kind).items() if e.prefix and not e.refusal]
            if prefixes and scheme in _SQL_DIALECTS:
                suggestion = f"{'db' if kind == 'result_backend' else 'sqla'}+{scheme}"
        label = "broker" if kind == "broker" else "result backend"
        return UnknownScheme(scheme, known, kind=label, suggestion=suggestion)

    def _load(self, entry: Entry, scheme: str) -> type[Any]:
        if isinstance(entry.target, type):
            return entry.target
        if entry.requires and importlib.util.find_spec(entry.requires) is None:
            raise MissingDependency(scheme, entry.extra or scheme, entry.requires)
        assert entry.target is not None
        module_name, _, attr = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and entry.builtin and exc.name.startswith("conveyor"):
                raise ConfigurationError(
                    f"the {scheme!r} scheme is reserved for conveyor's built-in implementation "
                    f"{entry.target}, which this version does not ship yet"
                ) from None
            if exc.name and not exc.name.startswith("conveyor"):
                raise MissingDependency(scheme, entry.extra or scheme, exc.name) from None
            raise
        cls: type[Any] = getattr(module, attr)
        return cls

    def _table(self, kind: Kind) -> dict[str, Entry]:
        table = self._tables.get(kind)
        if table is None:
            raise ValueError(f"kind must be 'broker' or 'result_backend', not {kind!r}")
        return table

    def _scan_entry_points(self) -> None:
        with self._lock:
            if not self._load_entry_points or self._scanned:
                return
            self._scanned = True
            # Imported here: importlib.metadata pulls in the email package, ~5 MiB of every
            # worker's memory, and is only needed on the first unknown scheme.
            from importlib.metadata import entry_points

            for kind, group in (("broker", BROKER_GROUP), ("result_backend", RESULT_BACKEND_GROUP)):
                table = self._tables[kind]
                for ep in entry_points(group=group):
                    # 'acmesql+' declares a prefix scheme ('acmesql+postgresql://...').
                    prefix = ep.name.endswith("+")
                    name = ep.name.lower().rstrip("+")
                    existing = table.get(name)
                    if existing is not None and existing.builtin:
                        log.warning(
                            "ignoring entry point %r in %s: %r is a built-in scheme",
                            ep.value,
                            group,
                            name,
                        )
                        continue
                    if existing is None:
                        table[name] = Entry(ep.value, prefix=prefix)


_SQL_DIALECTS = frozenset(
    {"postgresql", "postgres", "mysql", "mariadb", "sqlite", "oracle", "mssql", "psycopg2"}
)

#: The registry used when no ``registry=`` is passed. Injectable, never required.
default_registry = Registry()


def broker_from_url(url: str, *, registry: Registry | None = None, **options: Any) -> Broker:
    """Build a broker from ``url`` (its class's :meth:`Broker.from_url
    <conveyor.core.protocols.Broker.from_url>`); ``options`` override the URL's query
    parameters.

    >>> broker = broker_from_url("memory://")
    """
    cls: type[Broker] = (registry or default_registry).lookup("broker", url)
    return cls.from_url(url, **options)


def result_backend_from_url(
    url: str, *, registry: Registry | None = None, **options: Any
) -> ResultBackend:
    """Build a result backend from ``url`` (its class's :meth:`ResultBackend.from_url
    <conveyor.core.protocols.ResultBackend.from_url>`); ``options`` override the URL's query
    parameters."""
    cls: type[ResultBackend] = (registry or default_registry).lookup("result_backend", url)
    return cls.from_url(url, **options)

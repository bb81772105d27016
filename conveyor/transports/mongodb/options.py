"""Options of the MongoDB broker (documented in :mod:`conveyor.transports.mongodb`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from conveyor.core.errors import (
    ConfigurationError,
)
from conveyor.transports.mongodb.documents import _check_seconds

__all__ = ["OPTION_NAMES", "MongoDBBrokerOptions"]


@dataclass(frozen=True)
class MongoDBBrokerOptions:
    """Options of :class:`MongoDBBroker` (seconds as float).

    Attributes:
        lease_seconds: how long a delivery stays held without ``extend`` (> 0).
        poll_interval: first sleep of a blocking ``receive`` that found nothing.
        max_poll_interval: the backoff cap; also the worst-case latency of an idle consumer.
        promote_interval: minimum time between two "move due delayed messages to ready"
            steps of one broker (bounds how late a delayed message may be, on top of
            polling); 0 promotes on every poll.
        database: database name; None takes the URL's path, else ``conveyor``.
        collection: the message collection.
        create_indexes: create the claim and due-time indexes on first use (idempotent).
        connect_timeout: default for the driver's ``connectTimeoutMS``.
        server_selection_timeout: default for the driver's ``serverSelectionTimeoutMS``:
            how long an operation waits for a usable server before ``ConnectionLost``.
        operation_timeout: default for the driver's ``socketTimeoutMS``.
    """

    lease_seconds: float = 60.0
    poll_interval: float = 0.01
    max_poll_interval: float = 0.2
    promote_interval: float = 0.1
    database: str | None = None
    collection: str = "conveyor_messages"
    create_indexes: bool = True
    connect_timeout: float | None = 10.0
    server_selection_timeout: float | None = 10.0
    operation_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("lease_seconds", "poll_interval", "max_poll_interval"):
            _check_seconds(getattr(self, name), name)
        if self.max_poll_interval < self.poll_interval:
            raise ConfigurationError("max_poll_interval must be >= poll_interval")
        if not (isinstance(self.promote_interval, int | float) and self.promote_interval >= 0):
            raise ConfigurationError(f"promote_interval must be >= 0: {self.promote_interval!r}")
        for name in ("connect_timeout", "server_selection_timeout", "operation_timeout"):
            value = getattr(self, name)
            if value is not None:
                _check_seconds(value, name)
        if self.database is not None and not _valid_database_name(self.database):
            raise ConfigurationError(f"invalid MongoDB database name {self.database!r}")
        if not _valid_collection_name(self.collection):
            raise ConfigurationError(f"invalid MongoDB collection name {self.collection!r}")


OPTION_NAMES = frozenset(f.name for f in fields(MongoDBBrokerOptions))


def _valid_database_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in '/\\. "$\x00') and len(name) < 64


def _valid_collection_name(name: str) -> bool:
    return bool(name) and "$" not in name and "\x00" not in name and not name.startswith(".")

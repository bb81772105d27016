"""The MariaDB/MySQL packet guard.

A statement longer than the server's max_allowed_packet is not refused with an error: the
server drops the connection (2006 "gone away", 2013), which reads as a transient outage and
would be retried for ever. The guard refuses such a statement before it is sent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from conveyor._drivers.sql.errors import TooLarge, _brief

__all__ = ["install_packet_guard"]

log = logging.getLogger("conveyor.sql")

_LOCKS_GUARD = threading.Lock()
_PACKET_GUARD = "_conveyor_packet_guard"
_PACKET_FLOOR = 64 << 10  # statements smaller than this are never checked (nor looked up)
_ESCAPED = ("\\", "'", '"', "\0", "\n", "\r", "\x1a")  # sent as two bytes each by the drivers
_ESCAPED_BYTES = tuple(c.encode() for c in _ESCAPED)


def install_packet_guard(engine: Engine) -> None:
    """Refuse (``EncodeError``, nothing sent) a statement whose text with its escaped
    values would exceed ``@@max_allowed_packet``, read once per engine, the first time a
    statement of more than 64 KiB is seen. Idempotent."""
    with _LOCKS_GUARD:
        if engine.__dict__.get(_PACKET_GUARD) is not None:
            return
        limit: dict[str, int] = {}
        engine.__dict__[_PACKET_GUARD] = limit

    def check(conn: Any, _c: Any, statement: str, params: Any, _x: Any, many: bool) -> None:
        rows = params if many else [params]
        rough = len(statement) + max((_packet_bound(r) for r in rows), default=0)
        if rough <= _PACKET_FLOOR:
            return
        if "max" not in limit:
            found = _read_max_allowed_packet(conn)
            if found is None:
                return  # unknown: the statement goes as before
            limit["max"] = found
        if rough <= limit["max"]:
            return
        size = len(statement.encode()) + max((_packet_size(r) for r in rows), default=0)
        if size > limit["max"]:
            raise TooLarge(
                f"a statement of {size} bytes is more than the server takes "
                f"(max_allowed_packet = {limit['max']} bytes): the value cannot be stored"
            )

    event.listen(engine, "before_cursor_execute", check)


def _read_max_allowed_packet(conn: Connection) -> int | None:
    try:  # a cursor of its own, outside SQLAlchemy's events (this runs inside one)
        raw: Any = conn.connection.dbapi_connection
        cursor = raw.cursor()
        try:
            cursor.execute("SELECT @@max_allowed_packet")
            row = cursor.fetchone()
        finally:
            cursor.close()
        return int(row[0])
    except Exception as exc:  # a broken connection: the statement itself will say so
        log.debug("could not read max_allowed_packet: %s", _brief(exc))
        return None


def _packet_values(row: Any) -> Collection[Any]:
    if isinstance(row, Mapping):
        return row.values()
    return row if isinstance(row, list | tuple) else ()


def _packet_bound(row: Any) -> int:
    """An upper bound of the escaped size of one parameter set, computed without copies."""
    total = 0
    for v in _packet_values(row):
        if isinstance(v, str):
            total += 8 * len(v) + 2  # 4 UTF-8 bytes, each escaped at worst
        elif isinstance(v, bytes | bytearray | memoryview):
            total += 2 * len(v) + 10
        else:
            total += 32
    return total


def _packet_size(row: Any) -> int:
    """The size of one parameter set as the drivers send it (quoted, escaped)."""
    total = 0
    for v in _packet_values(row):
        if isinstance(v, str):
            total += len(v.encode("utf-8", "replace")) + sum(map(v.count, _ESCAPED)) + 2
        elif isinstance(v, bytes | bytearray | memoryview):
            data = bytes(v)
            total += len(data) + sum(map(data.count, _ESCAPED_BYTES)) + 10
        else:
            total += 32
    return total

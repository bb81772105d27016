"""PostgreSQL ``LISTEN`` wake-ups of the SQL broker's blocking ``receive``."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from conveyor._drivers.sql import Database

__all__ = ["Listener"]

log = logging.getLogger("conveyor.transports.sqlalchemy")


class Listener:
    """PostgreSQL ``LISTEN`` on one dedicated psycopg 3 connection, for waking ``receive``.

    One thread waits on it at a time; other threads of the broker poll as before. Any
    failure (server gone, another driver than psycopg 3) turns it off for good: polling alone
    is always correct, notifications only make it faster.
    """

    def __init__(self, db: Database, channel: str) -> None:
        self._db = db
        self._channel = channel
        self._lock = threading.Lock()
        self._conn: Any = None
        self._broken = False

    def _connect(self) -> Any:
        if self._conn is None:
            raw = self._db.engine.raw_connection()
            conn: Any = raw.driver_connection
            raw.detach()  # ours alone, never returned to the pool; closed by _drop
            self._conn = conn
            if not hasattr(conn, "notifies") or not type(conn).__module__.startswith("psycopg"):
                raise TypeError("LISTEN wake-ups need psycopg 3")
            conn.autocommit = True
            conn.execute(f'LISTEN "{self._channel}"')
        return self._conn

    def wait(self, names: Sequence[str], timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as a publish to one of ``names``
        is notified (also for one that happened since the last wait)."""
        if self._broken or not self._lock.acquire(blocking=False):
            time.sleep(timeout)
            return False
        start = time.monotonic()
        try:
            if self._conn is None:
                self._connect()
                # A publish committed between the caller's claim and this LISTEN sent its
                # notification to nobody: have the caller claim once more right away.
                return True
            conn = self._conn
            for note in conn.notifies(timeout=timeout):
                if note.payload in names:
                    return True
                if time.monotonic() - start >= timeout:
                    break
            return False
        except Exception:
            log.warning(
                "LISTEN wake-ups disabled for %r; polling only", self._channel, exc_info=True
            )
            self._broken = True
            self._drop()
            time.sleep(max(0.0, timeout - (time.monotonic() - start)))
            return False
        finally:
            self._lock.release()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._broken = True
            self._drop()

"""Hot-path Redis commands on a connection held per thread, and the Lua scripts (shared by
the Redis broker and result backend).

Why: redis-py's ``Redis.execute_command`` spends about 50 µs of CPU per command on its
machinery (pool checkout and release, the retry wrapper, observability hooks, response
callbacks), more than the round trip itself on loopback. Measured on the 2-core bench
machine, idle: ``Redis.ping()`` 145 µs wall / 88 µs CPU; the same PING sent with
``Connection.send_command`` + ``read_response`` on a held connection 75 µs / 32 µs; a bare
socket 66 µs / 28 µs. A worker makes two or three such calls per task and ``delay()`` one,
so this is the largest client-side cost conveyor controls (``docs/performance.md``).

What is kept from redis-py: connecting (TLS, AUTH, SELECT, ``CLIENT SETNAME``, Sentinel's
master discovery, health checks of idle connections), RESP parsing, its exception classes
and each connection's :class:`~redis.retry.Retry` policy (the same retries, backoff and
reconnects as ``execute_command``). What is skipped: response callbacks (callers get raw
replies: bytes, ints, lists) and the per-command pool round trip.

Each thread keeps one connection from the client's pool until it ends (the connection goes
back to the pool, open, for other threads) or :meth:`close`; a connection made before a
``fork()`` is never used in the child.

Reconnecting: every attempt first calls ``Connection.connect()`` (a no-op while connected).
redis-py's ``send_command`` reconnects a dropped connection to the host it last used; only
``connect()`` asks the sentinels for the current master (``SentinelManagedConnection``), and
redis-py's own clients reach it through the pool's checkout on the next command, which a
held connection never goes through. Without it a worker kept reconnecting to a dead master
after a Sentinel failover (``tests/faults/test_redis_sentinel.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.exceptions as rexc

__all__ = ["HeldConnections", "Script", "lua_source"]


def lua_source(*names: str) -> str:
    """The text of the Lua files ``<name>.lua`` of this package's ``lua/`` directory (every
    Lua script of the Redis broker and result backend), joined by newlines."""
    lua = resources.files(__package__ or "conveyor._drivers.redis").joinpath("lua")
    return "\n".join(lua.joinpath(f"{name}.lua").read_text("utf-8") for name in names)


class Script:
    """A Lua script known by its SHA1; loaded on the first NOSCRIPT (a restarted server or a
    new master has an empty script cache)."""

    __slots__ = ("sha", "text")

    def __init__(self, client: redis.Redis, text: str) -> None:
        self.text = text
        self.sha: str = client.register_script(text).sha


class HeldConnections:
    """Raw commands on one connection per thread of ``client``'s pool."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        self._all: list[Any] = []
        # Re-entrant: a finalizer (see _conn) may run from a garbage collection triggered
        # while this thread holds the lock.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ connections
    def _conn(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._pool.get_connection()
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._all.append(conn)
            # A thread that ends gives its connection back to the pool (a thread per
            # request calling delay() must not leave one open connection per request).
            weakref.finalize(threading.current_thread(), self._thread_ended, conn)
        return conn

    def _thread_ended(self, conn: Any) -> None:
        with self._lock:
            if not any(held is conn for held in self._all):
                return  # closed meanwhile: already disconnected
            self._all = [held for held in self._all if held is not conn]
        if getattr(conn, "pid", os.getpid()) == os.getpid():
            with contextlib.suppress(Exception):
                self._pool.release(conn)

    def close(self) -> None:
        """Hand every held connection back to the pool (disconnected)."""
        with self._lock:
            held, self._all = self._all, []
        pid = os.getpid()
        for conn in held:
            if getattr(conn, "pid", pid) == pid:
                conn.disconnect()
                with contextlib.suppress(Exception):  # a closed pool: nothing to give back to
                    self._pool.release(conn)
        self._local = threading.local()

    # ------------------------------------------------------------------ commands
    def call(self, *args: Any) -> Any:
        """Send one command and return its raw reply (retried as the client would).

        Raises:
            redis.exceptions.RedisError: as redis-py raises them (callers translate).
        """
        conn = self._conn()

        def once() -> Any:
            conn.connect()  # no-op while connected (module docstring: Reconnecting)
            conn.send_command(*args)
            return conn.read_response()

        return conn.retry.call_with_retry(once, lambda _exc: conn.disconnect())

    def pipeline(self, commands: Sequence[tuple[Any, ...]], *, transaction: bool) -> list[Any]:
        """Send ``commands`` in one write (inside ``MULTI``/``EXEC`` when ``transaction``)
        and return their replies; the first error reply is raised after all are read."""
        conn = self._conn()
        wrapped = [("MULTI",), *commands, ("EXEC",)] if transaction else list(commands)
        packed = conn.pack_commands(wrapped)

        def once() -> list[Any]:
            conn.connect()
            conn.send_packed_command(packed)
            replies: list[Any] = []
            error: Exception | None = None
            for _ in wrapped:
                try:
                    replies.append(conn.read_response())
                except rexc.ResponseError as exc:  # the connection is still in step
                    error = error or exc
                    replies.append(exc)
            if error is not None:
                raise error
            if transaction:
                results = replies[-1]
                if results is None:
                    raise rexc.WatchError("transaction aborted")
                for item in results:
                    if isinstance(item, Exception):
                        raise item
                return list(results)
            return replies

        result: list[Any] = conn.retry.call_with_retry(once, lambda _exc: conn.disconnect())
        return result

    def run_script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA`` (``SCRIPT LOAD`` once on NOSCRIPT, then again)."""
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            self.call("SCRIPT", "LOAD", script.text)
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)

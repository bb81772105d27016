"""``conveyor._drivers.redis.translating`` on real Redis servers (issue 13, class 1): only what
a retry may outlive is an ``OperationalError`` (connections, timeouts, ``LOADING``,
``BUSY``, ``OOM``, ``READONLY``...); an error reply that says the request itself is wrong
(``WRONGTYPE``, ``ERR ...``) and an argument redis-py refuses are ``ConfigurationError``
(``DecodeError`` when reading), so a worker fails such a task once instead of giving it back
for ever. Replies are classified by their error code, never by their wording."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.redis import REDIS_URL, free_port, require_redis, terminating, wait_for_port

from conveyor._drivers.redis import RedisConnectionOptions, reply_code, translating
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    OperationalError,
)
from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.redis import RedisBroker


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    made = require_redis(REDIS_URL)
    yield made
    made.close()


def _start(binary: str, folder: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    argv += ["--save", "", *extra]
    proc = subprocess.Popen(
        argv, stdout=(folder / f"{port}.log").open("ab"), stderr=subprocess.STDOUT
    )
    wait_for_port(port)
    return proc, port


def _translated(client: redis.Redis, *command: object, reading: bool = False) -> Exception:
    with pytest.raises(Exception) as info, translating("test", REDIS_URL, reading=reading):
        client.execute_command(*command)
    return info.value


def test_a_key_of_another_type_is_a_configuration_error_or_a_decode_error_when_reading(
    client: redis.Redis,
) -> None:
    key = unique_name("wrongtype")
    client.set(key, "text", ex=60)
    error = _translated(client, "LPUSH", key, "x")
    assert type(error) is ConfigurationError
    assert "WRONGTYPE" in str(error)
    assert type(_translated(client, "LRANGE", key, 0, -1, reading=True)) is DecodeError


def test_err_replies_are_configuration_errors(client: redis.Redis) -> None:
    key = unique_name("err")
    client.set(key, "not a number", ex=60)
    assert type(_translated(client, "INCR", key)) is ConfigurationError
    assert type(_translated(client, "NOSUCHCOMMAND")) is ConfigurationError
    assert type(_translated(client, "EVAL", "return redis.call('nope')", 0)) is ConfigurationError


def test_an_argument_redis_py_refuses_is_a_configuration_error(client: redis.Redis) -> None:
    with (
        pytest.raises(ConfigurationError, match="refused an argument"),
        translating("test", REDIS_URL),
    ):
        client.set(unique_name("k"), {"a": "dict"})  # type: ignore[arg-type]


def test_a_broker_queue_key_of_another_type_fails_publish_for_good(
    client: redis.Redis,
) -> None:
    """Before, this was an OperationalError: a worker re-publishing a retry or an early eta
    would give the message back for ever."""
    queue = unique_name("q")
    client.set(queue, "someone else's string", ex=60)
    broker = RedisBroker.from_url(REDIS_URL)
    try:
        with pytest.raises(ConfigurationError):
            # priority 9 is kombu's 0: the list named like the queue
            broker.publish(Envelope(id="x", body=b"{}", priority=9), queue=queue)
    finally:
        broker.close()
        client.delete(queue)


def test_out_of_memory_is_transient(redis_bin: str, tmp_path: Path) -> None:
    proc, port = _start(
        redis_bin, tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction"
    )
    with terminating(proc):
        private = redis.Redis(port=port)

        def fill() -> None:
            with translating("test", f"redis://127.0.0.1:{port}/0"):
                for i in range(1000):
                    private.set(f"k{i}", b"x" * 100_000)

        try:
            with pytest.raises(OperationalError) as info:
                fill()
            assert not isinstance(info.value, ConfigurationError)
            assert reply_code(info.value.__cause__) == "OOM"  # type: ignore[arg-type]
        finally:
            private.close()


def test_a_server_busy_in_a_script_is_transient(redis_bin: str, tmp_path: Path) -> None:
    proc, port = _start(redis_bin, tmp_path, "--busy-reply-threshold", "100")
    with terminating(proc):
        runner, other = redis.Redis(port=port), redis.Redis(port=port)
        looping = threading.Thread(
            target=lambda: _swallow(lambda: runner.eval("while true do end", 0)), daemon=True
        )
        looping.start()
        try:

            def busy() -> Exception | None:
                try:
                    with translating("test", f"redis://127.0.0.1:{port}/0"):
                        other.get("k")
                except OperationalError as exc:
                    return exc
                return None

            error = eventually(busy, 10, message="the server answers BUSY")
            assert reply_code(error.__cause__) == "BUSY"  # type: ignore[arg-type]
        finally:
            _swallow(lambda: redis.Redis(port=port).script_kill())
            looping.join(10)
            runner.close()
            other.close()


def test_a_read_only_replica_is_still_a_lost_connection(redis_bin: str, tmp_path: Path) -> None:
    master, master_port = _start(redis_bin, tmp_path)
    with terminating(master):
        replica, port = _start(redis_bin, tmp_path, "--replicaof", "127.0.0.1", str(master_port))
        with terminating(replica):
            private = redis.Redis(port=port)
            try:
                with (
                    pytest.raises(ConnectionLost),
                    translating("test", f"redis://127.0.0.1:{port}/0"),
                ):
                    private.set("k", "v")
            finally:
                private.close()


def _swallow(call: object) -> None:
    with contextlib.suppress(Exception):
        call()  # type: ignore[operator]


def test_sentinel_kwargs_never_show_in_the_options_repr() -> None:
    opts = RedisConnectionOptions(sentinel_kwargs={"password": "s3cr3t-sentinel"})
    assert "s3cr3t-sentinel" not in repr(opts)

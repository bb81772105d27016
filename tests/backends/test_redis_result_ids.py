"""The Redis result backend against hostile ids, a closed client, unencodable and
undecodable values, server refusals, push ``wait`` latency and secrets (issue 13).

Checks shared with the other backends live in ``hostileids.py``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.hostileids import (
    NOT_STRINGS,
    ODD_IDS,
    assert_closed_backend_raises_connection_lost,
    assert_lookalikes_never_meet,
    assert_odd_id_is_exact_or_refused,
    assert_refused_everywhere,
    assert_unencodable_result_is_an_encode_error,
    assert_wait_wakes_within,
    odd_id,
)
from support.redis import REDIS_URL, closed_port_url, delete_keys, require_redis

from conveyor.backends.redis import RedisResultBackend
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    OperationalError,
)
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

SECRET = "s3cr3t-redis-pw"


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def prefix(server: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own: every key the backend writes starts with it."""
    name = unique_name("ids") + ":"
    yield name
    delete_keys(server, f"{name}*")


@pytest.fixture
def backend(prefix: str) -> Iterator[RedisResultBackend]:
    b = RedisResultBackend.from_url(REDIS_URL, global_keyprefix=prefix)
    yield b
    b.close()


@pytest.fixture
def unreachable() -> Iterator[RedisResultBackend]:
    """A backend whose server is not there: whatever reaches the driver fails with
    ``OperationalError``, so a ``ConfigurationError`` proves the id never got that far."""
    b = RedisResultBackend.from_url(closed_port_url(), socket_connect_timeout=0.5, max_retries=0)
    yield b
    b.close()


def _keys(server: redis.Redis, prefix: str) -> list[bytes]:
    return list(server.scan_iter(match=f"{prefix}*", count=1000))


@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_ids_that_are_not_strings_are_refused_everywhere_and_write_no_key(
    backend: RedisResultBackend, server: redis.Redis, prefix: str, bad: Any
) -> None:
    assert_refused_everywhere(backend, bad)
    assert _keys(server, prefix) == []


@pytest.mark.parametrize("bad", NOT_STRINGS[:4], ids=repr)
def test_ids_that_are_not_strings_never_reach_the_driver(
    unreachable: RedisResultBackend, bad: Any
) -> None:
    assert_refused_everywhere(unreachable, bad)
    with pytest.raises(OperationalError):
        unreachable.fetch("a-proper-id")  # the control: a real id does reach the driver


@pytest.mark.parametrize("name", list(ODD_IDS))
def test_an_odd_id_is_stored_exactly_or_refused_everywhere(
    backend: RedisResultBackend, name: str
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    refused = {"NUL", "lone surrogate", "escaped surrogate", "10,000 characters"}
    refused.add("1025 UTF-8 bytes")
    assert stored is (name not in refused)


def test_lookalike_ids_never_read_or_delete_each_other(backend: RedisResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


def test_a_closed_backend_raises_connection_lost_everywhere(prefix: str) -> None:
    assert_closed_backend_raises_connection_lost(
        RedisResultBackend.from_url(REDIS_URL, global_keyprefix=prefix)
    )


def test_a_result_that_cannot_be_encoded_is_an_encode_error(
    backend: RedisResultBackend,
) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


def test_a_stored_value_that_is_not_a_result_is_a_decode_error(
    backend: RedisResultBackend, server: redis.Redis
) -> None:
    garbage, a_set = unique_name("garbage"), unique_name("set")
    server.set(backend.task_key(garbage), b"\xff\x00 not json", ex=60)
    server.sadd(backend.task_key(a_set), b"member")
    server.expire(backend.task_key(a_set), 60)
    group = unique_name("group")
    server.set(backend.group_key(group), b"[1, 2", ex=60)
    for call in (
        lambda: backend.fetch(garbage),
        lambda: backend.fetch(a_set),  # WRONGTYPE from the server
        lambda: backend.wait(a_set, 0.1),
        lambda: backend.fetch_group(group),
    ):
        with pytest.raises(DecodeError):
            call()
    assert backend.fetch_many([a_set]) == {}  # MGET answers nil for a key of another type


def test_server_refusals_of_a_counter_are_not_transient(backend: RedisResultBackend) -> None:
    key = unique_name("counter")
    assert backend.add_member(key, "m", ttl=60) == 1
    with pytest.raises(ConfigurationError, match="WRONGTYPE"):
        backend.incr(key, 1, ttl=60)  # the key holds a set
    other = unique_name("counter")
    assert backend.incr(other, 2**63 - 1, ttl=60) == 2**63 - 1
    with pytest.raises(ConfigurationError, match="overflow"):
        backend.incr(other, 1, ttl=60)
    with pytest.raises(ConfigurationError):
        backend.incr(other, 2**64, ttl=60)  # not a 64-bit integer
    with pytest.raises(ConfigurationError):
        backend.incr(other, "1", ttl=60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="WRONGTYPE"):
        backend.add_member(other, "m", ttl=60)  # the key holds a counter
    # A result key holding a record: a store over it still works (not a refusal).
    task_id = unique_name("task")
    backend.store(ResultRecord(task_id, State.STARTED), ttl=60)
    backend.store(ResultRecord(task_id, State.SUCCESS, 1), ttl=60)
    got = backend.fetch(task_id)
    assert got is not None
    assert got.result == 1


def test_wait_wakes_within_250_ms_of_a_store_from_another_client(prefix: str) -> None:
    waiter = RedisResultBackend.from_url(REDIS_URL, global_keyprefix=prefix)
    writer = RedisResultBackend.from_url(REDIS_URL, global_keyprefix=prefix)
    try:
        assert_wait_wakes_within(waiter, writer)
    finally:
        waiter.close()
        writer.close()


def test_no_password_shows_in_errors_or_reprs() -> None:
    url = closed_port_url().replace("redis://", f"redis://:{SECRET}@")
    backend = RedisResultBackend.from_url(url, socket_connect_timeout=0.5, max_retries=0)
    try:
        with pytest.raises(OperationalError) as info:
            backend.fetch("some-task")
        for text in (str(info.value), repr(backend), repr(backend.options)):
            assert SECRET not in text
        with pytest.raises(ConfigurationError) as refused:
            backend.fetch({"$ne": SECRET})  # type: ignore[arg-type]
        assert "$ne" in str(refused.value)  # the id is shown: it is data, not a secret
    finally:
        backend.close()

"""MemcachedResultBackend beyond the conformance suite: URLs, expiry times, failures, limits.

Server: ``CONVEYOR_TEST_MEMCACHED_URL`` (``tests/support/memcached.py``) where one is needed;
the URL and expiry-time tests need none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from support.memcached import (  # noqa: F401 - fixtures
    extra_memcached,
    free_port,
    memcached_url,
    raw_command,
)

from conveyor.backends.memcached import (
    MAX_RELATIVE_EXPIRY,
    MemcachedResultBackend,
    _parse_servers,
    exptime,
)
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    EncodeError,
    InvalidURL,
    UnsupportedFeature,
)
from conveyor.core.registry import Registry, broker_from_url, result_backend_from_url
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

UTC = timezone.utc
DAY = 86400


def _ok(task_id: str, value: object = "v") -> ResultRecord:
    return ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC))


@pytest.fixture
def backend(memcached_url: str) -> Iterator[MemcachedResultBackend]:  # noqa: F811
    made = MemcachedResultBackend.from_url(memcached_url)
    yield made
    made.close()


def _server(url: str) -> tuple[str, int]:
    return _parse_servers(url)[0][0]


# ================================================================== URLs and registry
@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("cache+memcached://127.0.0.1:11211/", [("127.0.0.1", 11211)]),
        ("memcached://cache-1", [("cache-1", 11211)]),
        ("cache+memcached://h1:11211;h2:11212/", [("h1", 11211), ("h2", 11212)]),
        ("memcached://h1;h2:1;h3/", [("h1", 11211), ("h2", 1), ("h3", 11211)]),
        ("memcached://h1:11211,h2:11211/", [("h1", 11211), ("h2", 11211)]),
        ("cache+memcached://h1:11211;cache+memcached://h2:11211/", None),
        ("memcached://[::1]:11311/", [("::1", 11311)]),
    ],
)
def test_urls_name_one_or_more_servers(url: str, servers: list[tuple[str, int]] | None) -> None:
    if servers is None:  # Celery-style repeated scheme is accepted too
        servers = [("h1", 11211), ("h2", 11211)]
        url = "cache+memcached://h1:11211;h2:11211/"
    parsed, query = _parse_servers(url)
    assert parsed == servers
    assert query == {}


def test_options_come_from_the_query_string_and_keywords_win() -> None:
    backend = MemcachedResultBackend.from_url(
        "cache+memcached://h1;h2/?default_ttl=60&serializer=json&timeout=2", timeout=3.0
    )
    try:
        assert backend.servers == (("h1", 11211), ("h2", 11211))
        assert backend.default_ttl == 60.0
        assert backend.options.timeout == 3.0
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("cache+memcached:///", InvalidURL),
        ("memcached://h:notaport/", InvalidURL),
        ("redis://h:6379/0", InvalidURL),
        ("memcached://h/some/path", InvalidURL),
        ("memcached://user:s3cret@h:11211/", ConfigurationError),
        ("memcached://h/?default_tll=5", ConfigurationError),
        ("memcached://h/?default_ttl=-1", ConfigurationError),
    ],
)
def test_bad_urls_are_refused_without_showing_a_password(url: str, error: type) -> None:
    with pytest.raises(error) as info:
        MemcachedResultBackend.from_url(url)
    assert "s3cret" not in str(info.value)


def test_both_schemes_are_registered_result_backends(memcached_url: str) -> None:  # noqa: F811
    host, port = _server(memcached_url)
    for scheme in ("cache+memcached", "memcached"):
        backend = result_backend_from_url(f"{scheme}://{host}:{port}/", registry=Registry())
        try:
            assert isinstance(backend, MemcachedResultBackend)
        finally:
            backend.close()


@pytest.mark.parametrize("url", ["cache+memcached://127.0.0.1:11211/", "memcached://h:11211/"])
def test_memcached_as_a_broker_is_refused_saying_why(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url(url, registry=Registry())
    message = str(info.value)
    assert "memcached cannot be a broker" in message
    assert "evicts" in message
    assert "no queue" in message
    assert "result backend" in message


def test_capabilities_declare_the_limits_of_memcached() -> None:
    caps = MemcachedResultBackend.capabilities
    assert Capability.DURABLE not in caps  # it evicts and forgets on restart
    assert Capability.WAIT not in caps  # no notifications
    assert {Capability.NATIVE_TTL, Capability.COUNTERS, Capability.GROUPS} <= caps
    assert {Capability.MULTI_READER, Capability.CROSS_PROCESS} <= caps


# ================================================================== expiry times
@pytest.mark.parametrize(
    ("ttl", "expected"),
    [(None, 0), (0.2, 2), (1.0, 2), (1.2, 3), (DAY, DAY + 1), (MAX_RELATIVE_EXPIRY - 1, None)],
)
def test_relative_expiry_never_ends_before_the_ttl(ttl: float | None, expected: int | None) -> None:
    if expected is None:
        expected = MAX_RELATIVE_EXPIRY
    assert exptime(ttl) == expected


def test_expiry_beyond_thirty_days_becomes_an_absolute_unix_time() -> None:
    now = 1_800_000_000.25
    ttl = 40 * DAY
    assert exptime(ttl, now=now) == math.ceil(now + ttl) + 1
    assert (
        exptime(MAX_RELATIVE_EXPIRY + 0.5, now=now)
        == math.ceil(now + MAX_RELATIVE_EXPIRY + 0.5) + 1
    )


def test_a_result_with_a_forty_day_ttl_is_stored_to_live_forty_days(
    backend: MemcachedResultBackend,
    memcached_url: str,  # noqa: F811
) -> None:
    task_id = unique_name("long")
    backend.store(_ok(task_id), ttl=40 * DAY)
    host, port = _server(memcached_url)
    reply = raw_command(host, port, f"mg celery-task-meta-{task_id} t")
    remaining = int(reply.split(" t", 1)[1].split()[0])
    # memcached converts absolute times with its own clock (a few seconds of slack)
    assert 40 * DAY - 60 <= remaining <= 40 * DAY + 10, reply
    assert backend.fetch(task_id) is not None


def test_a_result_stored_with_the_default_ttl_carries_it(
    backend: MemcachedResultBackend,
    memcached_url: str,  # noqa: F811
) -> None:
    task_id = unique_name("default-ttl")
    backend.store(_ok(task_id))
    host, port = _server(memcached_url)
    reply = raw_command(host, port, f"mg celery-task-meta-{task_id} t")
    remaining = int(reply.split(" t", 1)[1].split()[0])
    assert DAY - 5 <= remaining <= DAY + 1, reply


# ================================================================== counters
def test_counters_may_go_below_zero_and_back(backend: MemcachedResultBackend) -> None:
    key = unique_name("counter")
    assert backend.incr(key, -5) == -5
    assert backend.incr(key, 3) == -2
    assert backend.incr(key, 10) == 8
    assert backend.incr(key) == 9
    backend.forget_key(key)


def test_counters_never_collide_with_result_keys(backend: MemcachedResultBackend) -> None:
    task_id = unique_name("same-name")
    backend.store(_ok(task_id, "result"))
    assert backend.incr(f"{task_id}", 1) == 1
    got = backend.fetch(task_id)
    assert got is not None
    assert got.result == "result"
    backend.forget_key(task_id)


# ================================================================== keys, sizes, prefix
def test_a_task_id_memcached_cannot_use_as_a_key_is_a_configuration_error(
    backend: MemcachedResultBackend,
) -> None:
    for bad in ("has space", "x" * 300, "new\nline"):
        with pytest.raises(ConfigurationError):
            backend.store(_ok(bad))


def test_a_result_larger_than_the_item_size_limit_is_an_encode_error(
    backend: MemcachedResultBackend,
) -> None:
    with pytest.raises(EncodeError):
        backend.store(_ok(unique_name("huge"), "x" * (2 << 20)))


def test_global_keyprefix_follows_celerys_rule(
    memcached_url: str,  # noqa: F811
) -> None:
    host, port = _server(memcached_url)
    for prefix, stored_as in (("proj", "proj_"), ("proj:", "proj:"), ("p-", "p-")):
        backend = MemcachedResultBackend.from_url(memcached_url, global_keyprefix=prefix)
        try:
            task_id = unique_name("prefixed")
            backend.store(_ok(task_id))
            reply = raw_command(host, port, f"mg {stored_as}celery-task-meta-{task_id} t")
            assert reply.startswith("HD"), (prefix, reply)
            assert backend.fetch(task_id) is not None
        finally:
            backend.close()


# ================================================================== failures
def test_an_unreachable_server_raises_connection_lost_quickly() -> None:
    backend = MemcachedResultBackend.from_url(
        f"cache+memcached://127.0.0.1:{free_port()}/", connect_timeout=1.0, timeout=1.0
    )
    try:
        start = time.monotonic()
        for _ in range(3):  # every call raises: never a silent "not found"
            with pytest.raises(ConnectionLost):
                backend.fetch(unique_name("t"))
            with pytest.raises(ConnectionLost):
                backend.store(_ok(unique_name("t")))
        assert time.monotonic() - start < 10
    finally:
        backend.close()


def test_keys_of_a_dead_server_fail_loudly_and_are_never_moved_to_the_other(
    memcached_url: str,  # noqa: F811
) -> None:
    host, port = _server(memcached_url)
    dead = free_port()
    url = f"cache+memcached://{host}:{port};127.0.0.1:{dead}/"
    backend = MemcachedResultBackend.from_url(url, connect_timeout=0.5, timeout=0.5)
    try:
        lost = stored = 0
        for _ in range(3):  # the same ids, three rounds: the outcome never changes
            lost = stored = 0
            for i in range(20):
                try:
                    backend.store(_ok(f"{unique_name('spread')}-{i}"))
                    stored += 1
                except ConnectionLost:
                    lost += 1
        assert stored, "no key landed on the live server"
        assert lost, "no key landed on the dead server"
        ids = [f"pinned-{i}" for i in range(20)]
        first = {}
        for task_id in ids:
            try:
                backend.fetch(task_id)
                first[task_id] = "ok"
            except ConnectionLost:
                first[task_id] = "lost"
        for task_id in ids:  # a failing server is not dropped from the ring
            try:
                backend.fetch(task_id)
                again = "ok"
            except ConnectionLost:
                again = "lost"
            assert again == first[task_id], task_id
    finally:
        backend.close()


def test_after_close_every_operation_raises_connection_lost(
    memcached_url: str,  # noqa: F811
) -> None:
    backend = MemcachedResultBackend.from_url(memcached_url)
    backend.close()
    backend.close()
    for call in (
        lambda: backend.fetch("x"),
        lambda: backend.store(_ok("x")),
        lambda: backend.incr("x"),
        lambda: backend.forget("x"),
    ):
        with pytest.raises(ConnectionLost):
            call()


def test_wait_is_refused_and_wait_for_polls_instead(backend: MemcachedResultBackend) -> None:
    with pytest.raises(UnsupportedFeature):
        backend.wait("x", 0.1)

"""The memcached result backend against hostile ids, a closed client, unencodable and
undecodable values, server refusals and secrets (issue 13).

Memcached keys are printable ASCII without spaces, at most 250 bytes: ids that cannot be
part of such a key (as Celery's client sends it) are refused with ``ConfigurationError`` on
every method, ``validate_task_id`` included, before any server is asked. Checks shared with
the other backends live in ``hostileids.py``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from pymemcache.client.base import Client
from support.hostileids import (
    NOT_STRINGS,
    ODD_IDS,
    assert_closed_backend_raises_connection_lost,
    assert_lookalikes_never_meet,
    assert_odd_id_is_exact_or_refused,
    assert_refused_everywhere,
    assert_unencodable_result_is_an_encode_error,
    odd_id,
)
from support.memcached import free_port, memcached_url  # noqa: F401

from conveyor.backends.memcached import MemcachedResultBackend, translate_error
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    OperationalError,
)
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

UTC = timezone.utc


@pytest.fixture
def backend(memcached_url: str) -> Iterator[MemcachedResultBackend]:  # noqa: F811
    b = MemcachedResultBackend.from_url(memcached_url)
    yield b
    b.close()


@pytest.fixture
def raw(backend: MemcachedResultBackend) -> Iterator[Client]:
    host, port = backend.servers[0]
    client = Client((host, port), default_noreply=False)
    yield client
    client.close()


@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_ids_that_are_not_strings_are_refused_everywhere(
    backend: MemcachedResultBackend, bad: Any
) -> None:
    assert_refused_everywhere(backend, bad)


def test_ids_that_are_not_strings_or_no_key_never_reach_a_server() -> None:
    backend = MemcachedResultBackend.from_url(
        f"cache+memcached://127.0.0.1:{free_port()}/", connect_timeout=0.5, timeout=0.5
    )
    try:
        for bad in [*NOT_STRINGS[:4], "a space", "é", "x" * 300]:
            assert_refused_everywhere(backend, bad)
        with pytest.raises(OperationalError):
            backend.fetch("a-proper-id")  # the control: a real id does reach the server
    finally:
        backend.close()


@pytest.mark.parametrize("name", list(ODD_IDS))
def test_an_odd_id_is_stored_exactly_or_refused_everywhere(
    backend: MemcachedResultBackend, name: str
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    # Only printable ASCII without spaces, at most 230 characters, makes a key.
    assert stored is (name in {"155 characters", "156 characters", "key separators"})


@pytest.mark.parametrize(
    ("task_id", "why"),
    [
        ("with space", "' '"),
        ("new\nline", "'\\\\n'"),
        ("tâche", "'â'"),
        ("del\x7f", "'\\\\x7f'"),
        ("x" * 231, "allow 230"),
    ],
)
def test_an_id_memcached_cannot_key_is_refused_saying_why(
    backend: MemcachedResultBackend, task_id: str, why: str
) -> None:
    with pytest.raises(ConfigurationError, match=why):
        backend.validate_task_id(task_id)
    backend.validate_task_id("x" * 230)


def test_the_global_keyprefix_shortens_the_longest_id(memcached_url: str) -> None:  # noqa: F811
    backend = MemcachedResultBackend.from_url(memcached_url, global_keyprefix="proj")
    try:
        backend.validate_task_id("x" * 225)  # 250 - len("proj_celery-taskset-meta-")
        with pytest.raises(ConfigurationError):
            backend.validate_task_id("x" * 226)
    finally:
        backend.close()
    with pytest.raises(ConfigurationError, match="global_keyprefix"):
        MemcachedResultBackend.from_url(memcached_url, global_keyprefix="p" * 200)
    with pytest.raises(ConfigurationError, match="global_keyprefix"):
        MemcachedResultBackend.from_url(memcached_url, global_keyprefix="préfixe")


def test_lookalike_ids_never_read_or_delete_each_other(backend: MemcachedResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


def test_a_closed_backend_raises_connection_lost_everywhere(
    memcached_url: str,  # noqa: F811
) -> None:
    assert_closed_backend_raises_connection_lost(MemcachedResultBackend.from_url(memcached_url))


def test_a_result_that_cannot_be_encoded_is_an_encode_error(
    backend: MemcachedResultBackend,
) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


def test_stored_values_that_are_not_results_are_decode_errors(
    backend: MemcachedResultBackend, raw: Client
) -> None:
    task_id, group_id, key = unique_name("bad"), unique_name("bad"), unique_name("bad")
    raw.set(f"celery-task-meta-{task_id}", b"\xff not json", expire=60)
    raw.set(f"celery-taskset-meta-{group_id}", b"{", expire=60)
    raw.set(f"conveyor-counter-{key}", b"not a number", expire=60)
    with pytest.raises(DecodeError):
        backend.fetch(task_id)
    with pytest.raises(DecodeError):
        backend.fetch_many([task_id])
    with pytest.raises(DecodeError):
        backend.fetch_group(group_id)
    with pytest.raises(DecodeError):
        backend.incr(key, 1, ttl=60)
    with pytest.raises(DecodeError):
        backend.add_member(key, "m", ttl=60)


def test_a_client_error_reply_is_not_transient() -> None:
    from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

    refused = translate_error(MemcacheClientError("bad command line format"), what="x", url="")
    assert isinstance(refused, ConfigurationError)
    # A value over the item size limit is told apart by the backend asking the server its
    # limit, never from the reply's text (test_memcached_error_classes.py).
    out_of_memory = translate_error(
        MemcacheServerError("out of memory storing object"), what="x", url=""
    )
    assert isinstance(out_of_memory, OperationalError)


def test_a_record_over_the_item_size_limit_is_an_encode_error_and_stores_nothing(
    backend: MemcachedResultBackend,
) -> None:
    task_id = unique_name("huge")
    with pytest.raises(EncodeError):
        backend.store(
            ResultRecord(task_id, State.SUCCESS, "x" * (2 << 20), date_done=datetime.now(UTC)),
            ttl=60,
        )
    assert backend.fetch(task_id) is None


def test_no_password_can_reach_an_error_or_a_repr(memcached_url: str) -> None:  # noqa: F811
    host, port = memcached_url.split("//", 1)[1].rstrip("/").split(":")
    with pytest.raises(ConfigurationError) as info:
        MemcachedResultBackend.from_url(f"cache+memcached://user:s3cr3t-mc@{host}:{port}/")
    assert "s3cr3t-mc" not in str(info.value)

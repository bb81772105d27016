"""Reading Celery 5.7 compressed payloads from the memcached result backend is bounded and
checked like a worker's decode (issue 13, item 7): records and saved groups alike, only
the methods ``accept_compression`` names (the app passes its setting), decompression stops
at 64 MiB. Values are written with a plain client, as a Celery 5.7 writer would."""

from __future__ import annotations

import bz2
import json
import zlib
from collections.abc import Iterator

import pytest
from pymemcache.client.hash import HashClient
from support.memcached import memcached_url  # noqa: F401 - fixture

from conveyor import App
from conveyor.backends.memcached import MemcachedResultBackend, _parse_servers
from conveyor.core.celery import COMPRESSED_RESULT_MARKER
from conveyor.core.compression import DEFAULT_MAX_SIZE
from conveyor.core.errors import ContentDisallowed, DecodeError
from conveyor.testing.support import unique_name


@pytest.fixture
def raw(memcached_url: str) -> Iterator[_Strict]:  # noqa: F811
    servers, _ = _parse_servers(memcached_url)
    # noreply=False: a value memcached refuses to store (SERVER_ERROR out of memory in a
    # slab class with no page left) fails the test here, not as a missing record later
    client = HashClient(list(servers), default_noreply=False)
    yield _Strict(client)
    client.close()


class _Strict:
    """The raw client, whose ``set`` asserts that memcached stored the value."""

    def __init__(self, client: HashClient) -> None:
        self._client = client

    def set(self, key: str, value: bytes, *, expire: int) -> None:
        assert self._client.set(key, value, expire=expire), f"memcached did not store {key}"

    def close(self) -> None:
        self._client.close()


def _packed(mime: bytes, data: bytes) -> bytes:
    return COMPRESSED_RESULT_MARKER + mime + b"\x00" + data


def _meta(task_id: str) -> bytes:
    return json.dumps(
        {"status": "SUCCESS", "result": 7, "traceback": None, "children": [], "task_id": task_id}
    ).encode()


def _group(group_id: str) -> bytes:
    return json.dumps({"result": [[group_id, None], [[["t1", None], None]]]}).encode()


def test_a_compressed_saved_group_is_read_like_a_compressed_record(
    memcached_url: str,  # noqa: F811
    raw: _Strict,
) -> None:
    group_id = unique_name("group")
    raw.set(
        f"celery-taskset-meta-{group_id}",
        _packed(b"application/x-gzip", zlib.compress(_group(group_id))),
        expire=60,
    )
    backend = MemcachedResultBackend.from_url(memcached_url)
    try:
        group = backend.fetch_group(group_id)
        assert group is not None
        assert list(group.task_ids) == ["t1"]
    finally:
        backend.close()


def test_records_and_groups_compressed_with_a_method_not_accepted_are_refused(
    memcached_url: str,  # noqa: F811
    raw: _Strict,
) -> None:
    task_id, group_id = unique_name("task"), unique_name("group")
    raw.set(
        f"celery-task-meta-{task_id}",
        _packed(b"application/x-bz2", bz2.compress(_meta(task_id))),
        expire=60,
    )
    raw.set(
        f"celery-taskset-meta-{group_id}",
        _packed(b"application/x-bz2", bz2.compress(_group(group_id))),
        expire=60,
    )
    only_zlib = MemcachedResultBackend.from_url(memcached_url, accept_compression=("zlib",))
    every = MemcachedResultBackend.from_url(memcached_url)
    try:
        with pytest.raises(ContentDisallowed, match="accept_compression"):
            only_zlib.fetch(task_id)
        with pytest.raises(ContentDisallowed, match="accept_compression"):
            only_zlib.fetch_group(group_id)
        record = every.fetch(task_id)
        assert record is not None
        assert record.result == 7
    finally:
        only_zlib.close()
        every.close()


def test_the_apps_accept_compression_reaches_its_memcached_result_backend(
    memcached_url: str,  # noqa: F811
    raw: _Strict,
) -> None:
    task_id = unique_name("task")
    raw.set(
        f"celery-task-meta-{task_id}",
        _packed(b"application/x-bz2", bz2.compress(_meta(task_id))),
        expire=60,
    )
    app = App("cr", broker="memory://", backend=memcached_url, accept_compression=["zlib"])
    try:
        with pytest.raises(ContentDisallowed):
            app.backend.fetch(task_id)
    finally:
        app.close()


def test_a_compressed_group_that_inflates_past_the_limit_is_refused_while_decoding(
    memcached_url: str,  # noqa: F811
    raw: _Strict,
) -> None:
    group_id = unique_name("group")
    bomb = zlib.compress(b" " * (DEFAULT_MAX_SIZE + 1024 * 1024), 9)
    raw.set(f"celery-taskset-meta-{group_id}", _packed(b"application/x-gzip", bomb), expire=60)
    backend = MemcachedResultBackend.from_url(memcached_url)
    try:
        with pytest.raises(DecodeError, match="exceeds the limit"):
            backend.fetch_group(group_id)
    finally:
        backend.close()

"""Reading Celery 5.7 compressed payloads from the Redis result backend is bounded and
checked like a worker's decode (issue 13, item 7): only the methods ``accept_compression``
names (the app passes its setting), decompression stops at 64 MiB, and a payload naming a
compression this reader does not know is the payload's fault (``DecodeError``), never a
``ConfigurationError`` of the reader."""

from __future__ import annotations

import bz2
import json
import zlib
from collections.abc import Iterator

import pytest
import redis
from support.redis import REDIS_URL, require_redis

from conveyor import App
from conveyor.backends.redis import RedisResultBackend
from conveyor.core.celery import COMPRESSED_RESULT_MARKER
from conveyor.core.compression import DEFAULT_MAX_SIZE
from conveyor.core.errors import ContentDisallowed, DecodeError
from conveyor.testing.support import unique_name


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


def _packed(mime: bytes, data: bytes) -> bytes:
    return COMPRESSED_RESULT_MARKER + mime + b"\x00" + data


def _meta(task_id: str) -> bytes:
    return json.dumps(
        {"status": "SUCCESS", "result": 7, "traceback": None, "children": [], "task_id": task_id}
    ).encode()


def _group(group_id: str) -> bytes:
    return json.dumps({"result": [[group_id, None], [[["t1", None], None]]]}).encode()


def test_a_saved_group_naming_an_unknown_compression_is_a_decode_error(
    server: redis.Redis,
) -> None:
    group_id = unique_name("group")
    server.set(f"celery-taskset-meta-{group_id}", _packed(b"application/x-nope", b"zz"), ex=60)
    backend = RedisResultBackend.from_url(REDIS_URL)
    try:
        with pytest.raises(DecodeError, match="x-nope"):
            backend.fetch_group(group_id)
    finally:
        backend.close()
        server.delete(f"celery-taskset-meta-{group_id}")


def test_records_and_groups_compressed_with_a_method_not_accepted_are_refused(
    server: redis.Redis,
) -> None:
    task_id, group_id = unique_name("task"), unique_name("group")
    task_key, group_key = f"celery-task-meta-{task_id}", f"celery-taskset-meta-{group_id}"
    server.set(task_key, _packed(b"application/x-bz2", bz2.compress(_meta(task_id))), ex=60)
    server.set(group_key, _packed(b"application/x-bz2", bz2.compress(_group(group_id))), ex=60)
    only_zlib = RedisResultBackend.from_url(REDIS_URL, accept_compression=("zlib",))
    every = RedisResultBackend.from_url(REDIS_URL)
    try:
        with pytest.raises(ContentDisallowed, match="accept_compression"):
            only_zlib.fetch(task_id)
        with pytest.raises(ContentDisallowed, match="accept_compression"):
            only_zlib.fetch_group(group_id)
        record = every.fetch(task_id)  # the control: the default accepts bzip2
        assert record is not None
        assert record.result == 7
        group = every.fetch_group(group_id)
        assert group is not None
        assert list(group.task_ids) == ["t1"]
    finally:
        only_zlib.close()
        every.close()
        server.delete(task_key, group_key)


def test_the_apps_accept_compression_reaches_its_redis_result_backend(
    server: redis.Redis,
) -> None:
    task_id = unique_name("task")
    key = f"celery-task-meta-{task_id}"
    server.set(key, _packed(b"application/x-bz2", bz2.compress(_meta(task_id))), ex=60)
    app = App("cr", broker="memory://", backend=REDIS_URL, accept_compression=["zlib"])
    try:
        with pytest.raises(ContentDisallowed):
            app.backend.fetch(task_id)
        assert app.backend.fetch_many([]) == {}
    finally:
        app.close()
        server.delete(key)


def test_a_compressed_group_that_inflates_past_the_limit_is_refused_while_decoding(
    server: redis.Redis,
) -> None:
    """A 65 KB zlib payload that would inflate past 64 MiB: refused at the limit."""
    group_id = unique_name("group")
    key = f"celery-taskset-meta-{group_id}"
    bomb = zlib.compress(b" " * (DEFAULT_MAX_SIZE + 1024 * 1024), 9)
    assert len(bomb) < 100_000
    server.set(key, _packed(b"application/x-gzip", bomb), ex=60)
    backend = RedisResultBackend.from_url(REDIS_URL)
    try:
        with pytest.raises(DecodeError, match="exceeds the limit"):
            backend.fetch_group(group_id)
    finally:
        backend.close()
        server.delete(key)

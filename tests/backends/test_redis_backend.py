"""RedisResultBackend beyond the conformance suite: Celery's keys, PUBLISH, prefixes,
compressed payloads, and Celery's own backend reading ours and writing for us."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from support.redis import REDIS_URL, delete_keys, require_redis

from conveyor.backends.redis import RedisResultBackend
from conveyor.core.celery import COMPRESSED_RESULT_MARKER, celery_key_prefix
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import eventually, unique_name

UTC = timezone.utc


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def backend() -> Iterator[RedisResultBackend]:
    b = RedisResultBackend.from_url(REDIS_URL)
    yield b
    b.close()


def _success(task_id: str, value: Any = 42) -> ResultRecord:
    return ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC), children=[])


def test_a_record_is_celerys_key_json_and_expiry(
    backend: RedisResultBackend, server: redis.Redis
) -> None:
    task_id = unique_name("task")
    backend.store(_success(task_id), ttl=120)
    key = f"celery-task-meta-{task_id}"
    raw = server.get(key)
    assert raw is not None
    assert raw.startswith(b'{"status": "SUCCESS", "result": 42, "traceback": null')
    assert json.loads(raw)["task_id"] == task_id
    assert 119_000 < server.pttl(key) <= 120_000
    backend.store(_success(task_id))  # default ttl: Celery's one day
    assert server.ttl(key) == 120, "a stored SUCCESS was rewritten"
    server.delete(key)


def test_store_publishes_on_the_channel_celery_clients_wait_on(
    backend: RedisResultBackend, server: redis.Redis
) -> None:
    task_id = unique_name("task")
    pubsub = server.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    eventually(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, 5)
    backend.store(_success(task_id, "pushed"))
    message = eventually(lambda: pubsub.get_message(timeout=0.5), 5)
    assert json.loads(message["data"])["result"] == "pushed"
    pubsub.close()
    backend.forget(task_id)


def test_the_result_prefix_follows_celerys_underscore_rule(server: redis.Redis) -> None:
    assert celery_key_prefix("") == ""
    assert celery_key_prefix("app") == "app_"
    for ready in ("app:", "app_", "app-", "app."):
        assert celery_key_prefix(ready) == ready
    task_id = unique_name("task")
    b = RedisResultBackend.from_url(REDIS_URL, global_keyprefix="tenant")
    try:
        b.store(_success(task_id))
        assert server.exists(f"tenant_celery-task-meta-{task_id}") == 1
        b.forget(task_id)
    finally:
        b.close()


def test_compressed_results_are_written_and_read_and_a_success_stays(
    server: redis.Redis,
) -> None:
    task_id = unique_name("task")
    b = RedisResultBackend.from_url(REDIS_URL, compression="zlib")
    plain = RedisResultBackend.from_url(REDIS_URL)
    try:
        b.store(_success(task_id, "x" * 1000))
        raw = server.get(f"celery-task-meta-{task_id}")
        assert raw is not None
        assert raw.startswith(COMPRESSED_RESULT_MARKER + b"application/x-gzip\x00")
        assert plain.fetch(task_id).result == "x" * 1000  # type: ignore[union-attr]
        # The stored value is not JSON, so the SUCCESS check runs in Python under WATCH.
        plain.store(ResultRecord(task_id, State.FAILURE, {"exc_type": "E"}))
        assert plain.fetch(task_id).state is State.SUCCESS  # type: ignore[union-attr]
        plain.forget(task_id)
    finally:
        b.close()
        plain.close()


# ----------------------------------------------------------------- with Celery's backend


@pytest.fixture
def celery_app() -> Iterator[Any]:
    celery = pytest.importorskip("celery")
    app = celery.Celery(unique_name("rb"), broker="memory://", backend=REDIS_URL,
                        set_as_current=False)  # fmt: skip
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    yield app
    app.close()


def test_celery_reads_our_results_and_we_read_celerys(
    celery_app: Any, backend: RedisResultBackend, server: redis.Redis
) -> None:
    ours, theirs, failed = unique_name("ours"), unique_name("theirs"), unique_name("failed")
    backend.store(_success(ours, {"ü": [1, 2]}))
    assert celery_app.AsyncResult(ours).get(timeout=10) == {"ü": [1, 2]}
    backend.store(
        ResultRecord(
            failed,
            State.FAILURE,
            {"exc_type": "KeyError", "exc_message": ["nope"], "exc_module": "builtins"},
            traceback="Traceback...",
            date_done=datetime.now(UTC),
        )
    )
    with pytest.raises(KeyError):
        celery_app.AsyncResult(failed).get(timeout=10)
    celery_app.backend.store_result(theirs, [3, "four"], "SUCCESS")
    record = backend.fetch(theirs)
    assert record is not None
    assert (record.state, record.result) == (State.SUCCESS, [3, "four"])
    # Celery never overwrites our SUCCESS either.
    celery_app.backend.store_result(ours, "dup", "FAILURE")
    assert backend.fetch(ours).result == {"ü": [1, 2]}  # type: ignore[union-attr]
    delete_keys(server, f"celery-task-meta-{ours}", f"celery-task-meta-{theirs}")
    server.delete(f"celery-task-meta-{failed}")


def test_groups_round_trip_with_celerys_group_result(
    celery_app: Any, backend: RedisResultBackend
) -> None:
    from celery.result import AsyncResult, GroupResult

    members = [unique_name("m") for _ in range(3)]
    gid = unique_name("group")
    backend.store_group(GroupRecord(gid, tuple(members), datetime.now(UTC)))
    restored = GroupResult.restore(gid, app=celery_app)
    assert [r.id for r in restored.results] == members
    theirs = GroupResult(unique_name("g"), [AsyncResult(m, app=celery_app) for m in members],
                         app=celery_app)  # fmt: skip
    theirs.save()
    got = backend.fetch_group(theirs.id)
    assert got is not None
    assert list(got.task_ids) == members
    backend.forget_group(gid)
    backend.forget_group(theirs.id)

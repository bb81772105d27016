"""RedisResultBackend.wait: one kept connection per thread, one round trip to start a wait
(MULTI; GET; SUBSCRIBE; EXEC), and nothing of an earlier wait leaking into a later one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from support.redis import REDIS_URL, require_redis

from conveyor.backends.redis import RedisResultBackend
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name


@pytest.fixture
def backend() -> Iterator[RedisResultBackend]:
    client = require_redis(REDIS_URL)
    client.close()
    b = RedisResultBackend.from_url(REDIS_URL)
    yield b
    b.close()


def _record(task_id: str, state: State = State.SUCCESS, value: int = 1) -> ResultRecord:
    done = datetime.now(timezone.utc) if state is State.SUCCESS else None
    return ResultRecord(task_id, state, value, date_done=done, children=[])


def _store_soon(backend: RedisResultBackend, record: ResultRecord, delay: float) -> None:
    timer = threading.Timer(delay, lambda: backend.store(record, ttl=60))
    timer.start()


def test_sequential_waits_reuse_one_connection_and_each_gets_its_own_record(
    backend: RedisResultBackend,
) -> None:
    ids = [unique_name("wait") for _ in range(20)]
    for i, task_id in enumerate(ids):
        _store_soon(backend, _record(task_id, value=i), 0.01)
        record = backend.wait(task_id, 10.0)
        assert record is not None
        assert record.result == i
    assert len(backend._waiters) == 1
    for task_id in ids:
        backend.forget(task_id)


def test_a_record_stored_before_the_wait_is_returned_at_once(backend: RedisResultBackend) -> None:
    task_id = unique_name("wait")
    backend.store(_record(task_id, value=7), ttl=60)
    record = backend.wait(task_id, 5.0)
    assert record is not None
    assert record.result == 7
    backend.forget(task_id)


def test_a_late_store_of_a_timed_out_wait_does_not_confuse_the_next_wait(
    backend: RedisResultBackend,
) -> None:
    first, second = unique_name("wait"), unique_name("wait")
    assert backend.wait(first, 0.05) is None
    backend.store(_record(first, value=1), ttl=60)  # published after the first wait left
    _store_soon(backend, _record(second, state=State.STARTED), 0.02)
    _store_soon(backend, _record(second, value=2), 0.1)
    record = backend.wait(second, 10.0)
    assert record is not None
    assert record.state is State.SUCCESS
    assert record.result == 2
    for task_id in (first, second):
        backend.forget(task_id)


def test_waits_from_several_threads_each_use_their_own_connection(
    backend: RedisResultBackend,
) -> None:
    ids = [unique_name("wait") for _ in range(4)]
    results: dict[str, int] = {}

    def waiter(task_id: str) -> None:
        record = backend.wait(task_id, 10.0)
        assert record is not None
        results[task_id] = record.result

    threads = [threading.Thread(target=waiter, args=(t,)) for t in ids]
    for t in threads:
        t.start()
    for i, task_id in enumerate(ids):
        _store_soon(backend, _record(task_id, value=i), 0.05)
    for t in threads:
        t.join(15.0)
    assert results == {task_id: i for i, task_id in enumerate(ids)}
    assert len(backend._waiters) == 4
    for task_id in ids:
        backend.forget(task_id)


def test_a_dropped_connection_fails_one_wait_and_the_next_reconnects(
    backend: RedisResultBackend,
) -> None:
    task_id = unique_name("wait")
    backend.store(_record(task_id, value=3), ttl=60)
    assert backend.wait(task_id, 5.0) is not None
    waiter = backend._waiters[0]
    waiter.conn.disconnect()  # as if the server had closed it: redis-py reconnects
    record = backend.wait(task_id, 5.0)
    assert record is not None
    assert record.result == 3
    backend.forget(task_id)


def test_threads_that_end_close_their_wait_connections(backend: RedisResultBackend) -> None:
    import gc

    record = _record(unique_name("t"))
    backend.store(record)
    for _ in range(3):  # waves of short-lived threads, as a thread per request
        wave = [threading.Thread(target=backend.wait, args=(record.task_id, 1.0)) for _ in range(6)]
        for t in wave:
            t.start()
        for t in wave:
            t.join()
        del wave, t
        gc.collect()
    assert backend._waiters == []
    # what stays in use: only this thread's command connection (from the store above)
    assert len(backend.client.connection_pool._in_use_connections) == 1

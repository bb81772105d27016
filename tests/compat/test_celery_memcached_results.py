"""Real Celery 5.7 (its cache backend on pymemcache) and conveyor share memcached results.

* Celery writes with what its worker calls (``store_result``, ``mark_as_failure``,
  ``mark_as_retry``, ``mark_as_revoked``, ``GroupResult.save``), and a real in-process
  Celery worker (memory broker) runs tasks; conveyor's :class:`MemcachedResultBackend`
  reads equal values, states, exception types and groups.
* conveyor writes; ``celery.result.AsyncResult(...).get()`` / ``.state`` / the raised
  exception type and ``GroupResult.restore`` read it.
* With two servers (``cache+memcached://h1;h2/``) both sides put every key on the same
  server (pymemcache's rendezvous hashing), so each reads all of the other's results.
* A SUCCESS written by either side is never overwritten by the other.

Server: ``CONVEYOR_TEST_MEMCACHED_URL`` (``tests/memcachedsupport.py``); the second server is
started by the test. Skips without Celery.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.exceptions import Retry, TaskRevokedError
from celery.result import AsyncResult, GroupResult
from memcachedsupport import extra_memcached, memcached_url, raw_command  # noqa: F401
from pymemcache.client.base import Client

from conveyor.backends.memcached import MemcachedResultBackend, _parse_servers
from conveyor.core.celery import exception_from_meta, exception_to_meta
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import unique_name

UTC = timezone.utc
TIMEOUT = 20.0


def _celery_app(url: str) -> Celery:
    app = Celery(unique_name("compat"), broker="memory://", backend=url, set_as_current=False)
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    return app


@pytest.fixture
def app(memcached_url: str) -> Iterator[Celery]:  # noqa: F811
    app = _celery_app(memcached_url)
    yield app
    app.close()


@pytest.fixture
def ours(memcached_url: str) -> Iterator[MemcachedResultBackend]:  # noqa: F811
    backend = MemcachedResultBackend.from_url(memcached_url)
    yield backend
    backend.close()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # a real traceback, as a worker has one
        return caught


# ============================================================== Celery writes, conveyor reads
def test_a_success_stored_by_celery_is_read_by_conveyor(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("celery-ok")
    value = {"x": [1, 2.5, "ü", None, True], "n": 2**40}
    app.backend.store_result(task_id, value, "SUCCESS")
    got = ours.fetch(task_id)
    assert got is not None
    assert (got.state, got.result, got.traceback) == (State.SUCCESS, value, None)
    assert got.date_done is not None
    assert got.date_done.tzinfo is not None


def test_a_failure_stored_by_celery_is_read_by_conveyor_with_its_exception_type(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("celery-fail")
    app.backend.mark_as_failure(task_id, _raised(KeyError("nöpe")), traceback="Traceback: x\n")
    got = ours.fetch(task_id)
    assert got is not None
    assert got.state is State.FAILURE
    assert got.result == {"exc_type": "KeyError", "exc_message": ["nöpe"], "exc_module": "builtins"}
    assert got.traceback == "Traceback: x\n"
    rebuilt = exception_from_meta(got.result)
    assert type(rebuilt) is KeyError
    assert rebuilt.args == ("nöpe",)


def test_started_retry_and_revoked_states_stored_by_celery_are_read_by_conveyor(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    started, retried, revoked = (unique_name(p) for p in ("started", "retry", "revoked"))
    app.backend.store_result(started, {"pid": 42, "hostname": "celery@h"}, "STARTED")
    app.backend.mark_as_retry(retried, _raised(ValueError("again")), traceback="tb")
    app.backend.mark_as_revoked(revoked, reason="revoked")
    got = ours.fetch_many([started, retried, revoked])
    assert got[started].state is State.STARTED
    assert got[started].result == {"pid": 42, "hostname": "celery@h"}
    assert got[retried].state is State.RETRY
    assert got[retried].result["exc_type"] == "ValueError"
    assert got[revoked].state is State.REVOKED
    assert isinstance(exception_from_meta(got[revoked].result), TaskRevokedError)


def test_a_group_saved_by_celery_is_read_by_conveyor(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    group_id = unique_name("celery-group")
    members = [unique_name("member") for _ in range(3)]
    GroupResult(group_id, [AsyncResult(m, app=app) for m in members]).save(backend=app.backend)
    got = ours.fetch_group(group_id)
    assert got is not None
    assert got.task_ids == tuple(members)


def test_results_of_a_real_celery_worker_are_read_by_conveyor(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    from celery.contrib.testing.worker import start_worker

    @app.task(name="compat.memcached.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="compat.memcached.boom")  # type: ignore[untyped-decorator]
    def boom(text: str) -> None:
        raise LookupError(text)

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        ok = add.delay(2, 3)
        bad = boom.delay("ünïcode")
        assert ok.get(timeout=TIMEOUT) == 5
        with pytest.raises(LookupError):
            bad.get(timeout=TIMEOUT)
    got_ok, got_bad = ours.fetch(ok.id), ours.fetch(bad.id)
    assert got_ok is not None
    assert (got_ok.state, got_ok.result) == (State.SUCCESS, 5)
    assert got_bad is not None
    assert got_bad.state is State.FAILURE
    assert type(exception_from_meta(got_bad.result)) is LookupError


def test_a_celery_success_is_never_overwritten_by_conveyor(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("celery-first")
    app.backend.store_result(task_id, "first", "SUCCESS")
    ours.store(ResultRecord(task_id, State.FAILURE, exception_to_meta(ValueError("late"))))
    ours.store(ResultRecord(task_id, State.SUCCESS, "second", date_done=datetime.now(UTC)))
    assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "first"


# ============================================================== conveyor writes, Celery reads
def test_a_success_stored_by_conveyor_is_read_by_celery(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("ours-ok")
    value = {"x": [1, 2.5, "ü", None, True], "n": 2**40}
    ours.store(ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC)))
    result = AsyncResult(task_id, app=app)
    assert result.get(timeout=TIMEOUT) == value
    assert result.state == "SUCCESS"
    assert isinstance(result.date_done, datetime)


def test_a_failure_stored_by_conveyor_raises_its_exception_type_in_celery(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("ours-fail")
    ours.store(
        ResultRecord(
            task_id,
            State.FAILURE,
            exception_to_meta(KeyError("nöpe")),
            traceback="Traceback (most recent call last):\nKeyError: 'nöpe'\n",
            date_done=datetime.now(UTC),
        )
    )
    result = AsyncResult(task_id, app=app)
    with pytest.raises(KeyError) as info:
        result.get(timeout=TIMEOUT)
    assert info.value.args == ("nöpe",)
    assert result.state == "FAILURE"
    assert "KeyError" in (result.traceback or "")


def test_revoked_and_retry_states_stored_by_conveyor_are_read_by_celery(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    revoked, retried = unique_name("ours-revoked"), unique_name("ours-retry")
    ours.store(
        ResultRecord(
            revoked,
            State.REVOKED,
            exception_to_meta(TaskRevokedError("revoked")),
            date_done=datetime.now(UTC),
        )
    )
    ours.store(ResultRecord(retried, State.RETRY, exception_to_meta(Retry("Retry in 5s"))))
    with pytest.raises(TaskRevokedError):
        AsyncResult(revoked, app=app).get(timeout=TIMEOUT)
    pending = AsyncResult(retried, app=app)
    assert pending.state == "RETRY"
    assert isinstance(pending.result, Retry)


def test_a_group_stored_by_conveyor_is_restored_by_celery(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    group_id = unique_name("ours-group")
    members = tuple(unique_name("member") for _ in range(3))
    ours.store_group(GroupRecord(group_id, members, datetime.now(UTC)))
    for member in members:
        ours.store(ResultRecord(member, State.SUCCESS, member, date_done=datetime.now(UTC)))
    restored = GroupResult.restore(group_id, app=app)
    assert isinstance(restored, GroupResult)
    assert [r.id for r in restored.results] == list(members)
    assert restored.get(timeout=TIMEOUT) == list(members)


def test_a_conveyor_success_is_never_overwritten_by_celery(
    app: Celery, ours: MemcachedResultBackend
) -> None:
    task_id = unique_name("ours-first")
    ours.store(ResultRecord(task_id, State.SUCCESS, "first", date_done=datetime.now(UTC)))
    app.backend.store_result(task_id, "second", "SUCCESS")
    app.backend.mark_as_failure(task_id, _raised(ValueError("late")))
    got = ours.fetch(task_id)
    assert got is not None
    assert got.result == "first"


def test_conveyor_values_have_celerys_key_flags_and_document(
    app: Celery,
    ours: MemcachedResultBackend,
    memcached_url: str,  # noqa: F811
) -> None:
    ours_id, celery_id = unique_name("ours-raw"), unique_name("celery-raw")
    ours.store(ResultRecord(ours_id, State.SUCCESS, {"a": 1}, date_done=datetime.now(UTC)))
    app.backend.store_result(celery_id, {"a": 1}, "SUCCESS")
    (host, port), *_ = _parse_servers(memcached_url)[0]
    for task_id in (ours_id, celery_id):
        header = raw_command(host, port, f"get celery-task-meta-{task_id}")
        assert header.startswith(f"VALUE celery-task-meta-{task_id} 0 "), header  # flags 0
    client = Client((host, port))
    try:
        mine = json.loads(client.get(f"celery-task-meta-{ours_id}"))
        theirs = json.loads(client.get(f"celery-task-meta-{celery_id}"))
    finally:
        client.close()
    assert list(mine) == list(theirs)  # same keys in the same order
    assert mine["task_id"] == ours_id
    assert {k: mine[k] for k in ("status", "result", "traceback", "children")} == {
        k: theirs[k] for k in ("status", "result", "traceback", "children")
    }


# ============================================================== two servers
def test_with_two_servers_both_sides_find_every_result_of_the_other(
    memcached_url: str,  # noqa: F811
    extra_memcached: tuple[str, int],  # noqa: F811
) -> None:
    (first, _query) = _parse_servers(memcached_url)
    host, port = first[0]
    extra_host, extra_port = extra_memcached
    url = f"cache+memcached://{host}:{port};{extra_host}:{extra_port}/"
    app = _celery_app(url)
    ours = MemcachedResultBackend.from_url(url)
    try:
        mine = [unique_name("ours-multi") for _ in range(40)]
        theirs = [unique_name("celery-multi") for _ in range(40)]
        for task_id in mine:
            ours.store(ResultRecord(task_id, State.SUCCESS, task_id, date_done=datetime.now(UTC)))
        for task_id in theirs:
            app.backend.store_result(task_id, task_id, "SUCCESS")
        assert [AsyncResult(t, app=app).get(timeout=TIMEOUT) for t in mine] == mine
        found = ours.fetch_many(theirs)
        assert [found[t].result for t in theirs] == theirs
        # The keys really are spread over both servers.
        on_extra = [
            t
            for t in mine + theirs
            if raw_command(extra_host, extra_port, f"get celery-task-meta-{t}").startswith("VALUE")
        ]
        assert 0 < len(on_extra) < len(mine + theirs)
    finally:
        ours.close()
        app.close()

"""Real Celery 5.7 and conveyor share one MongoDB result store, in both directions.

* Celery writes with exactly what its worker calls (``backend.store_result``,
  ``mark_as_failure``, ``mark_as_retry``, ``mark_as_revoked``, ``GroupResult.save``), and a
  real in-process Celery worker (``celery.contrib.testing.worker``, memory broker) runs
  tasks; conveyor's :class:`MongoDBResultBackend` reads equal values, states, exception
  types, extended fields and groups.
* conveyor writes; ``celery.result.AsyncResult(...).get()`` / ``.state`` / the raised
  exception type, ``.children``, the extended fields and ``GroupResult.restore`` read it.
* A SUCCESS written by either side is never overwritten by the other (Celery 5.7's filter
  ``{_id, status != SUCCESS}`` and ours); Celery's documents expire for conveyor by
  ``date_done`` + ``default_ttl`` like Celery's own cleanup.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/mongosupport.py``); both sides use its
database (Celery takes it from the URL path too). Skips without Celery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.app.task import Context
from celery.exceptions import Retry, TaskRevokedError
from celery.result import AsyncResult, GroupResult
from mongosupport import mongodb_url  # noqa: F401 - fixture
from pymongo import MongoClient

from conveyor.backends.mongodb import MongoDBResultBackend
from conveyor.core.celery import exception_from_meta, exception_to_meta
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import eventually, unique_name

UTC = timezone.utc
TIMEOUT = 20.0


def _celery_app(url: str, *, extended: bool = False) -> Celery:
    app = Celery(unique_name("compat"), broker="memory://", backend=url, set_as_current=False)
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    app.conf.result_extended = extended
    return app


@pytest.fixture
def app(mongodb_url: str) -> Iterator[Celery]:  # noqa: F811
    app = _celery_app(mongodb_url)
    yield app
    app.close()


@pytest.fixture
def extended_app(mongodb_url: str) -> Iterator[Celery]:  # noqa: F811
    app = _celery_app(mongodb_url, extended=True)
    yield app
    app.close()


@pytest.fixture
def ours(mongodb_url: str) -> Iterator[MongoDBResultBackend]:  # noqa: F811
    backend = MongoDBResultBackend.from_url(mongodb_url)
    yield backend
    backend.close()


@pytest.fixture
def raw(mongodb_url: str) -> Iterator[Any]:  # noqa: F811
    """The shared database through plain pymongo (to look at documents as stored)."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    yield client.get_default_database()
    client.close()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # a real traceback, as a worker has one
        return caught


# ============================================================== Celery writes, conveyor reads
def test_a_success_stored_by_celery_is_read_by_conveyor(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id = unique_name("celery-ok")
    value = {"x": [1, 2.5, "ü", None, True], "n": 2**40}
    app.backend.store_result(task_id, value, "SUCCESS")
    got = ours.fetch(task_id)
    assert got is not None
    assert got.state is State.SUCCESS
    assert got.result == value
    assert got.date_done is not None
    assert got.date_done.tzinfo is not None
    assert abs(got.date_done - datetime.now(UTC)) < timedelta(minutes=1)
    assert got.traceback is None


def test_a_failure_stored_by_celery_is_read_by_conveyor_with_its_exception_type(
    app: Celery, ours: MongoDBResultBackend
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
    app: Celery, ours: MongoDBResultBackend
) -> None:
    started, retried, revoked = (unique_name(p) for p in ("started", "retry", "revoked"))
    app.backend.store_result(started, {"pid": 42, "hostname": "celery@h"}, "STARTED")
    app.backend.mark_as_retry(retried, _raised(ValueError("again")), traceback="tb")
    app.backend.mark_as_revoked(revoked, reason="revoked")
    got = ours.fetch_many([started, retried, revoked])
    assert got[started].state is State.STARTED
    assert got[started].result == {"pid": 42, "hostname": "celery@h"}
    assert got[started].date_done is None
    assert got[retried].state is State.RETRY
    assert got[retried].result["exc_type"] == "ValueError"
    assert got[revoked].state is State.REVOKED
    assert isinstance(exception_from_meta(got[revoked].result), TaskRevokedError)


def test_extended_fields_stored_by_celery_are_read_by_conveyor(
    extended_app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id = unique_name("celery-ext")
    request = Context(
        id=task_id,
        task="proj.tasks.add",
        args=[2, "three"],
        kwargs={"x": 1},
        hostname="celery@host-1",
        retries=2,
        delivery_info={"routing_key": "celery"},
        group=unique_name("g"),
        parent_id=unique_name("p"),
    )
    extended_app.backend.store_result(task_id, 5, "SUCCESS", request=request)
    got = ours.fetch(task_id)
    assert got is not None
    assert got.result == 5
    assert got.group_id == request.group
    assert got.parent_id == request.parent_id
    assert got.extended == {
        "name": "proj.tasks.add",
        "args": [2, "three"],
        "kwargs": {"x": 1},
        "worker": "celery@host-1",
        "retries": 2,
        "queue": "celery",
    }


def test_a_group_saved_by_celery_is_read_by_conveyor(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    group_id = unique_name("celery-group")
    members = [unique_name("member") for _ in range(3)]
    GroupResult(group_id, [AsyncResult(m, app=app) for m in members]).save(backend=app.backend)
    got = ours.fetch_group(group_id)
    assert got is not None
    assert got.task_ids == tuple(members)
    assert got.date_done is not None


def test_results_of_a_real_celery_worker_are_read_by_conveyor(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    from celery.contrib.testing.worker import start_worker

    @app.task(name="compat.mongo.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="compat.mongo.boom")  # type: ignore[untyped-decorator]
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
    assert (got_ok.state, got_ok.result, got_ok.children) == (State.SUCCESS, 5, [])
    assert got_bad is not None
    assert got_bad.state is State.FAILURE
    assert type(exception_from_meta(got_bad.result)) is LookupError
    assert got_bad.traceback is not None
    assert "LookupError" in got_bad.traceback


def test_a_celery_success_is_never_overwritten_by_conveyor(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id = unique_name("celery-first")
    app.backend.store_result(task_id, "first", "SUCCESS")
    ours.store(ResultRecord(task_id, State.FAILURE, exception_to_meta(ValueError("late"))))
    ours.store(ResultRecord(task_id, State.SUCCESS, "second", date_done=datetime.now(UTC)))
    assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "first"
    got = ours.fetch(task_id)
    assert got is not None
    assert got.result == "first"


def test_celery_documents_expire_for_conveyor_by_date_done(
    mongodb_url: str,  # noqa: F811
    raw: Any,
) -> None:
    # Own collections: a purge with a 1 s default_ttl would also take every other test's
    # Celery-written documents.
    tasks, groups = unique_name("taskmeta"), unique_name("groupmeta")
    app = _celery_app(mongodb_url)
    app.conf.mongodb_backend_settings = {
        "taskmeta_collection": tasks,
        "groupmeta_collection": groups,
    }
    short = MongoDBResultBackend.from_url(
        mongodb_url, default_ttl=2.0, taskmeta_collection=tasks, groupmeta_collection=groups
    )
    try:
        task_id = unique_name("celery-old")
        short.create_indexes()
        before = time.monotonic()
        app.backend.store_result(task_id, "old", "SUCCESS")
        found = short.fetch(task_id)
        if time.monotonic() - before < 1.5:  # a slow test server may take longer than that
            assert found is not None
        time.sleep(max(0.0, before + 2.5 - time.monotonic()))
        assert short.fetch(task_id) is None, "a Celery result outlived date_done + default_ttl"
        assert short.purge_expired() == 1
        assert app.backend.get_task_meta(task_id)["status"] == "PENDING"
    finally:
        short.close()
        app.close()
        raw.drop_collection(tasks)
        raw.drop_collection(groups)


# ============================================================== conveyor writes, Celery reads
def test_a_success_stored_by_conveyor_is_read_by_celery(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id = unique_name("ours-ok")
    value = {"x": [1, 2.5, "ü", None, True], "n": 2**40}
    ours.store(ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC)))
    result = AsyncResult(task_id, app=app)
    assert result.get(timeout=TIMEOUT) == value
    assert result.state == "SUCCESS"
    assert isinstance(result.date_done, datetime)


def test_a_failure_stored_by_conveyor_raises_its_exception_type_in_celery(
    app: Celery, ours: MongoDBResultBackend
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
    assert result.traceback is not None
    assert "KeyError" in result.traceback


def test_revoked_and_retry_states_stored_by_conveyor_are_read_by_celery(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    revoked, retried = unique_name("ours-revoked"), unique_name("ours-retry")
    ours.store(
        ResultRecord(
            revoked,
            State.REVOKED,
            {
                "exc_type": "TaskRevokedError",
                "exc_message": ["revoked"],
                "exc_module": "celery.exceptions",
            },
            date_done=datetime.now(UTC),
        )
    )
    ours.store(ResultRecord(retried, State.RETRY, exception_to_meta(Retry("Retry in 5s"))))
    with pytest.raises(TaskRevokedError):
        AsyncResult(revoked, app=app).get(timeout=TIMEOUT)
    pending = AsyncResult(retried, app=app)
    assert pending.state == "RETRY"
    assert isinstance(pending.result, Retry)


def test_children_and_extended_fields_stored_by_conveyor_are_read_by_celery(
    extended_app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id, child = unique_name("ours-parent"), unique_name("ours-child")
    ours.store(
        ResultRecord(
            task_id,
            State.SUCCESS,
            [1, 2],
            date_done=datetime.now(UTC),
            children=[[[child, None], None]],
            extended={
                "name": "proj.tasks.add",
                "args": [1, "two"],
                "kwargs": {"k": "v"},
                "worker": "conveyor@host",
                "retries": 1,
                "queue": "default",
            },
        )
    )
    result = AsyncResult(task_id, app=extended_app)
    assert result.get(timeout=TIMEOUT) == [1, 2]
    assert [c.id for c in result.children] == [child]
    assert (result.name, result.args, result.kwargs) == ("proj.tasks.add", [1, "two"], {"k": "v"})
    assert (result.worker, result.retries, result.queue) == ("conveyor@host", 1, "default")


def test_a_group_stored_by_conveyor_is_restored_by_celery(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    group_id = unique_name("ours-group")
    members = tuple(unique_name("member") for _ in range(3))
    ours.store_group(GroupRecord(group_id, members, datetime.now(UTC)))
    for member in members:
        ours.store(ResultRecord(member, State.SUCCESS, member, date_done=datetime.now(UTC)))
    restored = GroupResult.restore(group_id, app=app)
    # Celery's MongoDB backend keeps only member ids, so its restore gives back the list of
    # AsyncResults rather than a GroupResult (Celery's own behaviour with its own documents).
    results = restored.results if isinstance(restored, GroupResult) else restored
    assert [r.id for r in results] == list(members)
    assert [r.get(timeout=TIMEOUT) for r in results] == list(members)


def test_a_conveyor_success_is_never_overwritten_by_celery(
    app: Celery, ours: MongoDBResultBackend
) -> None:
    task_id = unique_name("ours-first")
    ours.store(ResultRecord(task_id, State.SUCCESS, "first", date_done=datetime.now(UTC)))
    app.backend.store_result(task_id, "second", "SUCCESS")
    app.backend.mark_as_failure(task_id, _raised(ValueError("late")))
    got = ours.fetch(task_id)
    assert got is not None
    assert got.result == "first"
    assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "first"


def test_conveyor_documents_have_celerys_fields_and_types(
    ours: MongoDBResultBackend, raw: Any
) -> None:
    task_id = unique_name("ours-layout")
    ours.store(ResultRecord(task_id, State.SUCCESS, {"a": 1}, date_done=datetime.now(UTC)))
    doc = raw["celery_taskmeta"].find_one({"_id": task_id})
    assert doc is not None
    assert set(doc) == {
        "_id",
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "expires_at",
    }
    assert doc["status"] == "SUCCESS"
    assert doc["result"] == '{"a": 1}'  # JSON text, as Celery's json result serializer writes
    assert isinstance(doc["date_done"], datetime)
    assert isinstance(doc["expires_at"], datetime)
    eventually(lambda: ours.fetch(task_id) is not None, 5)

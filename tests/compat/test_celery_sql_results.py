"""Real Celery 5.7 and conveyor share one SQL result store (``db+<url>``), both directions.

* Celery writes with exactly what its worker calls (``backend.store_result``,
  ``mark_as_failure``, ``mark_as_revoked``, ``GroupResult.save``) and, once per database, a
  real in-process Celery worker runs tasks; conveyor's ``SQLAlchemyResultBackend`` reads
  equal values, states, exception types, extended fields and groups.
* conveyor writes; ``celery.result.AsyncResult(...).get()`` / ``.state`` / raised exception
  type and ``GroupResult.restore`` read it.
* Tables created by either side are used by the other; Celery rows expire for conveyor by
  ``date_done`` + ``default_ttl`` like Celery's own cleanup; a SUCCESS written by either side
  is never overwritten by the other.

Databases: SQLite files always, PostgreSQL and MariaDB as selected by ``CONVEYOR_TEST_SQL``
(``tests/sqlsupport.py``). Skips when Celery or SQLAlchemy is not installed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

celery = pytest.importorskip("celery")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa  # noqa: E402
from celery import Celery  # noqa: E402
from celery.exceptions import TaskRevokedError  # noqa: E402
from celery.result import AsyncResult, GroupResult  # noqa: E402
from sqlsupport import SqlTarget, make_target, selected  # noqa: E402

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend  # noqa: E402
from conveyor.core.celery import exception_from_meta  # noqa: E402
from conveyor.core.types import GroupRecord, ResultRecord, State  # noqa: E402
from conveyor.testing.support import unique_name  # noqa: E402

UTC = timezone.utc
KINDS = [k for k in selected() if k in ("sqlite", "postgres", "mysql")]


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    return make_target(request.param, tmp_path)


def _celery_app(url: str, *, extended: bool = False) -> Celery:
    app = Celery(
        unique_name("compat"), broker="memory://", backend=f"db+{url}", set_as_current=False
    )
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    app.conf.result_extended = extended
    return app


@pytest.fixture
def app(target: SqlTarget) -> Iterator[Celery]:
    app = _celery_app(target.url)
    yield app
    app.close()


@pytest.fixture
def ours(target: SqlTarget) -> Iterator[SQLAlchemyResultBackend]:
    backend = SQLAlchemyResultBackend.from_url(f"db+{target.url}")
    yield backend
    backend.close()


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # a real traceback, as a worker has one
        return caught


# ============================================================== Celery writes, conveyor reads
def test_a_success_stored_by_celery_is_read_by_conveyor(
    app: Celery, ours: SQLAlchemyResultBackend
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
    app: Celery, ours: SQLAlchemyResultBackend
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
    app: Celery, ours: SQLAlchemyResultBackend
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
    assert got[revoked].result["exc_type"] == "TaskRevokedError"
    assert isinstance(exception_from_meta(got[revoked].result), TaskRevokedError)


def test_a_group_saved_by_celery_is_read_by_conveyor(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    group_id = unique_name("celery-group")
    members = [unique_name("member") for _ in range(3)]
    GroupResult(group_id, [AsyncResult(m, app=app) for m in members]).save(backend=app.backend)
    got = ours.fetch_group(group_id)
    assert got is not None
    assert got.task_ids == tuple(members)
    assert got.date_done is not None


def test_results_of_a_real_celery_worker_are_read_by_conveyor(target: SqlTarget) -> None:
    # A real Celery 5.7 worker (solo pool, in this process, memory:// broker) runs tasks and
    # stores results through Celery's own database backend, result_extended on.
    from celery.contrib.testing.worker import start_worker

    app = _celery_app(target.url, extended=True)

    # Task names are per test (the app's unique main name): Celery's shared task registry
    # would otherwise hand a later test the first test's callables.
    @app.task(name=f"{app.main}.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name=f"{app.main}.explode")
    def explode() -> None:
        raise LookupError("kaboom")

    ours = SQLAlchemyResultBackend.from_url(f"db+{target.url}")
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            ok = add.delay(2, 3)
            bad = explode.delay()
            assert ok.get(timeout=30) == 5
            with pytest.raises(LookupError):
                bad.get(timeout=30)
        good, failed = ours.fetch(ok.id), ours.fetch(bad.id)
    finally:
        ours.close()
        app.close()
    assert good is not None
    assert good.state is State.SUCCESS
    assert good.result == 5
    assert good.extended["name"] == f"{app.main}.add"
    assert good.extended["args"] == [2, 3]
    assert good.extended["kwargs"] == {}
    assert good.extended["queue"] == "celery"
    assert good.extended["retries"] == 0
    assert failed is not None
    assert failed.state is State.FAILURE
    assert failed.result["exc_type"] == "LookupError"
    assert failed.traceback is not None
    assert "kaboom" in failed.traceback


# ============================================================== conveyor writes, Celery reads
def test_a_success_stored_by_conveyor_is_read_by_async_result(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    task_id = unique_name("ours-ok")
    value = {"answer": [42, "ü", 0.5, None]}
    ours.store(ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC)))
    result = AsyncResult(task_id, app=app)
    assert result.get(timeout=5) == value
    assert result.state == "SUCCESS"
    assert result.successful()
    assert result.date_done is not None


def test_a_failure_stored_by_conveyor_raises_its_exception_type_in_celery(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    task_id = unique_name("ours-fail")
    document = {"exc_type": "ValueError", "exc_message": ["boom", 7], "exc_module": "builtins"}
    ours.store(ResultRecord(task_id, State.FAILURE, document, traceback="Traceback: ours\n"))
    result = AsyncResult(task_id, app=app)
    with pytest.raises(ValueError) as info:
        result.get(timeout=5)
    assert info.value.args == ("boom", 7)
    assert result.state == "FAILURE"
    assert result.traceback == "Traceback: ours\n"


def test_a_non_ready_state_stored_by_conveyor_is_seen_then_replaced_for_celery(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    task_id = unique_name("ours-started")
    ours.store(ResultRecord(task_id, State.STARTED, {"pid": 1, "hostname": "conveyor@h"}))
    result = AsyncResult(task_id, app=app)
    assert result.state == "STARTED"
    assert result.info == {"pid": 1, "hostname": "conveyor@h"}
    ours.store(ResultRecord(task_id, State.SUCCESS, "done", children=[]))
    assert AsyncResult(task_id, app=app).get(timeout=5) == "done"


def test_a_group_stored_by_conveyor_is_restored_by_celery(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    group_id = unique_name("ours-group")
    members = tuple(unique_name("member") for _ in range(3))
    for member in members:
        ours.store(ResultRecord(member, State.SUCCESS, member.upper()))
    ours.store_group(GroupRecord(group_id, members))
    restored = GroupResult.restore(group_id, app=app)
    assert restored is not None
    assert [r.id for r in restored.results] == list(members)
    assert restored.get(timeout=5) == [m.upper() for m in members]


# ============================================================== shared rules
def test_a_success_is_never_overwritten_by_the_other_implementation(
    app: Celery, ours: SQLAlchemyResultBackend
) -> None:
    theirs_first, ours_first = unique_name("celery-first"), unique_name("ours-first")
    app.backend.store_result(theirs_first, "celery won", "SUCCESS")
    ours.store(ResultRecord(theirs_first, State.FAILURE, {"exc_type": "X", "exc_message": []}))
    assert ours.fetch(theirs_first).result == "celery won"  # type: ignore[union-attr]
    ours.store(ResultRecord(ours_first, State.SUCCESS, "conveyor won"))
    app.backend.store_result(ours_first, "duplicate", "SUCCESS")
    app.backend.mark_as_failure(ours_first, _raised(RuntimeError("late")))
    assert AsyncResult(ours_first, app=app).get(timeout=5) == "conveyor won"


def test_celery_rows_expire_for_conveyor_by_date_done_like_celery_cleanup(
    app: Celery, target: SqlTarget
) -> None:
    backend = SQLAlchemyResultBackend.from_url(f"db+{target.url}", default_ttl=3600.0)
    try:
        old, fresh = unique_name("old"), unique_name("fresh")
        app.backend.store_result(old, "old", "SUCCESS")
        app.backend.store_result(fresh, "fresh", "SUCCESS")
        assert backend.fetch(old) is not None  # make sure our columns exist before poking
        two_hours_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=2)
        table = sa.table("celery_taskmeta", sa.column("task_id"), sa.column("date_done"))
        with backend.engine.begin() as conn:
            conn.execute(
                sa.update(table).where(table.c.task_id == old).values(date_done=two_hours_ago)
            )
        assert backend.fetch(old) is None
        assert backend.fetch(fresh) is not None
        assert backend.purge_expired(batch_size=100) >= 1
        assert AsyncResult(old, app=app).state == "PENDING"
        assert AsyncResult(fresh, app=app).get(timeout=5) == "fresh"
    finally:
        backend.close()


def _columns(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[1] for row in db.execute("PRAGMA table_info(celery_taskmeta)")}


def test_tables_created_by_celery_are_adopted_by_conveyor(tmp_path: Path) -> None:
    path = tmp_path / "celery-first.db"
    app = _celery_app(f"sqlite:///{path}")
    task_id = unique_name("celery-made")
    app.backend.store_result(task_id, [1, 2], "SUCCESS")
    assert "expires_at" not in _columns(path)
    ours = SQLAlchemyResultBackend.from_url(f"db+sqlite:///{path}")
    try:
        assert ours.fetch(task_id).result == [1, 2]  # type: ignore[union-attr]
        assert {"expires_at", "group_id", "parent_id"} <= _columns(path)
        mine = unique_name("ours")
        ours.store(ResultRecord(mine, State.SUCCESS, "x"), ttl=60.0)
        assert AsyncResult(mine, app=app).get(timeout=5) == "x"
    finally:
        ours.close()
        app.close()


def test_tables_created_by_conveyor_are_used_by_celery(tmp_path: Path) -> None:
    path = tmp_path / "conveyor-first.db"
    ours = SQLAlchemyResultBackend.from_url(f"db+sqlite:///{path}")
    app = _celery_app(f"sqlite:///{path}")
    try:
        mine = unique_name("ours")
        ours.store(ResultRecord(mine, State.SUCCESS, {"k": "v"}))
        assert AsyncResult(mine, app=app).get(timeout=5) == {"k": "v"}
        theirs = unique_name("celery")
        app.backend.store_result(theirs, 7, "SUCCESS")
        got: Any = ours.fetch(theirs)
        assert (got.state, got.result) == (State.SUCCESS, 7)
    finally:
        ours.close()
        app.close()

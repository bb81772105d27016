"""What every Celery-compatible result store must do with real Celery 5.7, written once.

:class:`CeleryResultCompat` holds the scenarios the memcached, MongoDB and SQL result stores
share; each ``test_celery_<store>_results.py`` subclasses it as ``TestCelery<Store>Results``,
supplies the fixture interface below and keeps its store-specific tests beside it.

* Celery writes with exactly what its worker calls (``backend.store_result``,
  ``mark_as_failure``, ``mark_as_retry``, ``mark_as_revoked``, ``GroupResult.save``), and a
  real in-process Celery worker (``celery.contrib.testing.worker``, solo pool, memory
  broker) runs tasks; conveyor reads equal values, states, exception types and groups.
* conveyor writes; ``celery.result.AsyncResult(...).get()`` / ``.state`` / ``.traceback`` /
  the raised exception type and ``GroupResult.restore`` read it.
* A SUCCESS written by either side is never overwritten by the other.

Fixture interface (a subclass provides):

* ``result_url`` -- a URL of the store that both Celery (``backend=``) and conveyor's
  ``from_url`` accept; every test uses fresh ids, so the store may be shared.
* ``backend_class`` -- conveyor's result backend class for that URL.
* ``reads_extended`` -- conveyor reads Celery's ``result_extended`` fields from this store.
* ``celery_groups_have_date_done`` -- the group document Celery saves on this store carries a
  ``date_done`` (Celery's key-value stores save only the member list).
* ``celery_stores_children`` -- Celery's documents on this store keep a task's ``children``
  (Celery's SQL table has no such column).
* ``restores_group_results`` -- ``GroupResult.restore`` gives back a ``GroupResult`` (Celery's
  MongoDB backend keeps only member ids and gives back the list of ``AsyncResult`` instead).

The subclass gets ``app`` / ``extended_app`` (Celery apps on the store, json results,
``result_extended`` off / on) and ``ours`` (conveyor's backend) as fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.exceptions import Retry, TaskRevokedError
from celery.result import AsyncResult, GroupResult

from conveyor.core.celery import exception_from_meta, exception_to_meta
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import unique_name

__all__ = ["TIMEOUT", "UTC", "CeleryResultCompat", "celery_app", "raised"]

UTC = timezone.utc
TIMEOUT = 20.0
VALUE = {"x": [1, 2.5, "ü", None, True], "n": 2**40, "answer": [42, "ü", 0.5, None]}
REVOKED_DOCUMENT = {
    "exc_type": "TaskRevokedError",
    "exc_message": ["revoked"],
    "exc_module": "celery.exceptions",
}


def celery_app(url: str, *, extended: bool = False) -> Celery:
    """A Celery app storing json results at ``url`` (its own unique main name)."""
    app = Celery(unique_name("compat"), broker="memory://", backend=url, set_as_current=False)
    app.conf.result_serializer = "json"
    app.conf.accept_content = ["json"]
    app.conf.result_extended = extended
    return app


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback, as a worker has one."""
    try:
        raise exc
    except BaseException as caught:
        return caught


class CeleryResultCompat:
    """The shared scenarios; see the module docstring for the fixture interface."""

    backend_class: ClassVar[Any]
    reads_extended: ClassVar[bool] = True
    restores_group_results: ClassVar[bool] = True
    celery_groups_have_date_done: ClassVar[bool] = True
    celery_stores_children: ClassVar[bool] = True

    @pytest.fixture
    def result_url(self) -> str:
        raise NotImplementedError("a CeleryResultCompat subclass provides result_url")

    @pytest.fixture
    def app(self, result_url: str) -> Iterator[Celery]:
        app = celery_app(result_url)
        yield app
        app.close()

    @pytest.fixture
    def extended_app(self, result_url: str) -> Iterator[Celery]:
        app = celery_app(result_url, extended=True)
        yield app
        app.close()

    @pytest.fixture
    def ours(self, result_url: str) -> Iterator[Any]:
        backend = self.backend_class.from_url(result_url)
        yield backend
        backend.close()

    # ========================================================== Celery writes, conveyor reads
    def test_a_success_stored_by_celery_is_read_by_conveyor(self, app: Celery, ours: Any) -> None:
        task_id = unique_name("celery-ok")
        app.backend.store_result(task_id, VALUE, "SUCCESS")
        got = ours.fetch(task_id)
        assert got is not None
        assert (got.state, got.result, got.traceback) == (State.SUCCESS, VALUE, None)
        assert got.date_done is not None
        assert got.date_done.tzinfo is not None
        assert abs(got.date_done - datetime.now(UTC)) < timedelta(minutes=1)

    def test_a_failure_stored_by_celery_is_read_by_conveyor_with_its_exception_type(
        self, app: Celery, ours: Any
    ) -> None:
        task_id = unique_name("celery-fail")
        app.backend.mark_as_failure(task_id, raised(KeyError("nöpe")), traceback="Traceback: x\n")
        got = ours.fetch(task_id)
        assert got is not None
        assert got.state is State.FAILURE
        assert got.result == {
            "exc_type": "KeyError",
            "exc_message": ["nöpe"],
            "exc_module": "builtins",
        }
        assert got.traceback == "Traceback: x\n"
        rebuilt = exception_from_meta(got.result)
        assert type(rebuilt) is KeyError
        assert rebuilt.args == ("nöpe",)

    def test_started_retry_and_revoked_states_stored_by_celery_are_read_by_conveyor(
        self, app: Celery, ours: Any
    ) -> None:
        started, retried, revoked = (unique_name(p) for p in ("started", "retry", "revoked"))
        app.backend.store_result(started, {"pid": 42, "hostname": "celery@h"}, "STARTED")
        app.backend.mark_as_retry(retried, raised(ValueError("again")), traceback="tb")
        app.backend.mark_as_revoked(revoked, reason="revoked")
        got = ours.fetch_many([started, retried, revoked])
        assert got[started].state is State.STARTED
        assert got[started].result == {"pid": 42, "hostname": "celery@h"}
        assert got[started].date_done is None
        assert got[retried].state is State.RETRY
        assert got[retried].result["exc_type"] == "ValueError"
        assert type(exception_from_meta(got[retried].result)) is ValueError
        assert got[revoked].state is State.REVOKED
        assert got[revoked].result["exc_type"] == "TaskRevokedError"
        assert isinstance(exception_from_meta(got[revoked].result), TaskRevokedError)

    def test_a_group_saved_by_celery_is_read_by_conveyor(self, app: Celery, ours: Any) -> None:
        group_id = unique_name("celery-group")
        members = [unique_name("member") for _ in range(3)]
        GroupResult(group_id, [AsyncResult(m, app=app) for m in members]).save(backend=app.backend)
        got = ours.fetch_group(group_id)
        assert got is not None
        assert got.group_id == group_id
        assert got.task_ids == tuple(members)
        if self.celery_groups_have_date_done:
            assert got.date_done is not None

    def test_results_of_a_real_celery_worker_are_read_by_conveyor(
        self, extended_app: Celery, ours: Any
    ) -> None:
        from celery.contrib.testing.worker import start_worker

        app = extended_app

        # Task names are per test (the app's unique main name): Celery's shared task registry
        # would otherwise hand a later test the first test's callables.
        @app.task(name=f"{app.main}.add")  # type: ignore[untyped-decorator]
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(name=f"{app.main}.boom")  # type: ignore[untyped-decorator]
        def boom(text: str) -> None:
            raise LookupError(text)

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            ok = add.delay(2, 3)
            bad = boom.delay("ünïcode kaboom")
            assert ok.get(timeout=TIMEOUT) == 5
            with pytest.raises(LookupError):
                bad.get(timeout=TIMEOUT)
        good, failed = ours.fetch(ok.id), ours.fetch(bad.id)
        assert good is not None
        assert (good.state, good.result) == (State.SUCCESS, 5)
        if self.celery_stores_children:
            assert good.children == []
        assert good.date_done is not None
        assert failed is not None
        assert failed.state is State.FAILURE
        assert failed.result["exc_type"] == "LookupError"
        assert type(exception_from_meta(failed.result)) is LookupError
        assert failed.traceback is not None
        assert "LookupError" in failed.traceback
        assert "kaboom" in failed.traceback
        if self.reads_extended:
            assert good.extended["name"] == f"{app.main}.add"
            assert good.extended["args"] == [2, 3]
            assert good.extended["kwargs"] == {}
            assert good.extended["queue"] == "celery"
            assert good.extended["retries"] == 0

    # ========================================================== conveyor writes, Celery reads
    def test_a_success_stored_by_conveyor_is_read_by_celery(self, app: Celery, ours: Any) -> None:
        task_id = unique_name("ours-ok")
        ours.store(ResultRecord(task_id, State.SUCCESS, VALUE, date_done=datetime.now(UTC)))
        result = AsyncResult(task_id, app=app)
        assert result.get(timeout=TIMEOUT) == VALUE
        assert result.state == "SUCCESS"
        assert result.successful()
        assert isinstance(result.date_done, datetime)

    def test_a_failure_stored_by_conveyor_raises_its_exception_type_in_celery(
        self, app: Celery, ours: Any
    ) -> None:
        # One record built by exception_to_meta with a date_done, one hand-written document
        # without (the backend stamps it).
        built, written = unique_name("ours-fail"), unique_name("ours-fail-doc")
        traceback = "Traceback (most recent call last):\nKeyError: 'nöpe'\n"
        ours.store(
            ResultRecord(
                built,
                State.FAILURE,
                exception_to_meta(KeyError("nöpe")),
                traceback=traceback,
                date_done=datetime.now(UTC),
            )
        )
        document = {"exc_type": "ValueError", "exc_message": ["boom", 7], "exc_module": "builtins"}
        ours.store(ResultRecord(written, State.FAILURE, document, traceback="Traceback: ours\n"))
        result = AsyncResult(built, app=app)
        with pytest.raises(KeyError) as key_error:
            result.get(timeout=TIMEOUT)
        assert key_error.value.args == ("nöpe",)
        assert result.state == "FAILURE"
        assert result.traceback == traceback
        other = AsyncResult(written, app=app)
        with pytest.raises(ValueError) as value_error:
            other.get(timeout=TIMEOUT)
        assert value_error.value.args == ("boom", 7)
        assert other.state == "FAILURE"
        assert other.traceback == "Traceback: ours\n"

    def test_revoked_and_retry_states_stored_by_conveyor_are_read_by_celery(
        self, app: Celery, ours: Any
    ) -> None:
        built, written, retried = (
            unique_name(p) for p in ("ours-revoked", "ours-revoked-doc", "ours-retry")
        )
        meta = exception_to_meta(TaskRevokedError("revoked"))
        ours.store(ResultRecord(built, State.REVOKED, meta, date_done=datetime.now(UTC)))
        ours.store(
            ResultRecord(written, State.REVOKED, REVOKED_DOCUMENT, date_done=datetime.now(UTC))
        )
        ours.store(ResultRecord(retried, State.RETRY, exception_to_meta(Retry("Retry in 5s"))))
        for task_id in (built, written):
            with pytest.raises(TaskRevokedError):
                AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
            assert AsyncResult(task_id, app=app).state == "REVOKED"
        pending = AsyncResult(retried, app=app)
        assert pending.state == "RETRY"
        assert isinstance(pending.result, Retry)

    def test_a_non_ready_state_stored_by_conveyor_is_seen_then_replaced_for_celery(
        self, app: Celery, ours: Any
    ) -> None:
        task_id = unique_name("ours-started")
        ours.store(ResultRecord(task_id, State.STARTED, {"pid": 1, "hostname": "conveyor@h"}))
        result = AsyncResult(task_id, app=app)
        assert result.state == "STARTED"
        assert result.info == {"pid": 1, "hostname": "conveyor@h"}
        ours.store(ResultRecord(task_id, State.SUCCESS, "done", children=[]))
        assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "done"

    def test_a_group_stored_by_conveyor_is_restored_by_celery(self, app: Celery, ours: Any) -> None:
        group_id = unique_name("ours-group")
        members = tuple(unique_name("member") for _ in range(3))
        ours.store_group(GroupRecord(group_id, members, datetime.now(UTC)))
        for member in members:
            ours.store(ResultRecord(member, State.SUCCESS, member.upper()))
        restored = GroupResult.restore(group_id, app=app)
        assert restored is not None
        if self.restores_group_results:
            assert isinstance(restored, GroupResult)
            assert restored.id == group_id
            assert restored.get(timeout=TIMEOUT) == [m.upper() for m in members]
            results = restored.results
        else:
            # Celery's own behaviour with its own documents on this store.
            assert isinstance(restored, list)
            results = restored
        assert [r.id for r in results] == list(members)
        assert [r.get(timeout=TIMEOUT) for r in results] == [m.upper() for m in members]

    # ========================================================== SUCCESS is final, either way
    def test_a_celery_success_is_never_overwritten_by_conveyor(
        self, app: Celery, ours: Any
    ) -> None:
        task_id = unique_name("celery-first")
        app.backend.store_result(task_id, "first", "SUCCESS")
        ours.store(ResultRecord(task_id, State.FAILURE, exception_to_meta(ValueError("late"))))
        ours.store(ResultRecord(task_id, State.SUCCESS, "second", date_done=datetime.now(UTC)))
        assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "first"
        got = ours.fetch(task_id)
        assert got is not None
        assert (got.state, got.result) == (State.SUCCESS, "first")

    def test_a_conveyor_success_is_never_overwritten_by_celery(
        self, app: Celery, ours: Any
    ) -> None:
        task_id = unique_name("ours-first")
        ours.store(ResultRecord(task_id, State.SUCCESS, "first", date_done=datetime.now(UTC)))
        app.backend.store_result(task_id, "second", "SUCCESS")
        app.backend.mark_as_failure(task_id, raised(ValueError("late")))
        got = ours.fetch(task_id)
        assert got is not None
        assert (got.state, got.result) == (State.SUCCESS, "first")
        assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == "first"

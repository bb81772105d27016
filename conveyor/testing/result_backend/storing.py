"""Result backend suite, storing: every state and return value round-trips; ``fetch``,
``fetch_many``, ``forget``, and which later store replaces a record.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from conveyor.core.types import State
from conveyor.testing.result_backend.base import (
    _UTC,
    MakeResultBackend,
    ResultBackendSuite,
    _assert_same_record,
    _assert_same_time,
    _exc,
    _record,
)
from conveyor.testing.support import unique_name

_STATE_RESULTS: dict[State, Any] = {
    State.PENDING: None,
    State.RECEIVED: None,
    State.STARTED: {"pid": 4242, "hostname": "celery@worker-1"},
    State.SUCCESS: {"answer": 42},
    State.FAILURE: _exc("ValueError", "boom", 42),
    State.RETRY: _exc("Retry", "Retry in 5s", module="celery.exceptions"),
    State.REVOKED: _exc("TaskRevokedError", "revoked", module="celery.exceptions"),
    State.REJECTED: _exc("Reject", "no reason", module="celery.exceptions"),
    State.IGNORED: None,
}

_RETURN_VALUES: dict[str, Any] = {
    "none": None,
    "zero": 0,
    "negative-int": -17,
    "big-int": 2**53 + 1,
    "float": 0.1,
    "float-integral": 3.0,
    "true": True,
    "false": False,
    "empty-string": "",
    "unicode": 'héllo wörld ✓ 日本語 🎉 \u0000 \n\t"quoted"',
    "empty-list": [],
    "empty-dict": {},
    "list": [1, "two", 3.5, None, True],
    "nested": {"a": [1, {"b": [None, {"c": "ü"}]}], "d": {"e": {"f": [[], {}]}}},
    "large-string": "x" * (256 * 1024),
    "large-list": list(range(10_000)),
}


class StoreChecks(ResultBackendSuite):
    """A record comes back as stored, to any client, until forgotten or replaced."""

    @pytest.mark.parametrize("state", list(State), ids=[s.value for s in State])
    def test_every_state_round_trips(self, result_backend: Any, state: State) -> None:
        record = _record(
            unique_name("task"),
            state,
            _STATE_RESULTS[state],
            traceback="Traceback (most recent call last):\n  ...\nError: x\n"
            if state in (State.FAILURE, State.RETRY)
            else None,
        )
        result_backend.store(record)
        _assert_same_record(result_backend.fetch(record.task_id), record)

    @pytest.mark.parametrize("value", list(_RETURN_VALUES.values()), ids=list(_RETURN_VALUES))
    def test_a_success_return_value_round_trips_as_json_equal_data(
        self, result_backend: Any, value: Any
    ) -> None:
        record = _record(unique_name("task"), State.SUCCESS, value)
        result_backend.store(record)
        _assert_same_record(result_backend.fetch(record.task_id), record)

    def test_a_failure_keeps_its_exception_document_and_traceback(
        self, result_backend: Any
    ) -> None:
        traceback = (
            'Traceback (most recent call last):\n  File "tasks.py", line 3, in add\n'
            "    raise KeyError('nöpe')\nKeyError: 'nöpe'\n"
        )
        record = _record(
            unique_name("task"),
            State.FAILURE,
            _exc("KeyError", "nöpe", ["nested", 1]),
            traceback=traceback,
        )
        result_backend.store(record)
        got = result_backend.fetch(record.task_id)
        _assert_same_record(got, record)
        assert set(got.result) == {"exc_type", "exc_message", "exc_module"}
        assert got.ready

    def test_date_done_round_trips_as_aware_utc_within_a_millisecond(
        self, result_backend: Any
    ) -> None:
        now = datetime.now(_UTC)
        record = _record(unique_name("task"), State.SUCCESS, 1, date_done=now)
        result_backend.store(record)
        _assert_same_time(result_backend.fetch(record.task_id).date_done, now, "date_done")

    def test_children_group_and_parent_round_trip(self, result_backend: Any) -> None:
        child = unique_name("child")
        record = _record(
            unique_name("task"),
            State.SUCCESS,
            [1, 2],
            children=[[[child, None], None], [[unique_name("g"), None], [[[child, None], None]]]],
            group_id=unique_name("group"),
            parent_id=unique_name("parent"),
        )
        result_backend.store(record)
        _assert_same_record(result_backend.fetch(record.task_id), record)

    def test_extended_fields_round_trip(self, result_backend: Any) -> None:
        extended = {
            "name": "proj.tasks.add",
            "args": [2, "three", {"four": 4}],
            "kwargs": {"x": 1, "ü": [None]},
            "worker": "celery@host-1",
            "retries": 2,
            "queue": "celery",
        }
        record = _record(unique_name("task"), State.SUCCESS, 5, extended=extended)
        result_backend.store(record)
        _assert_same_record(result_backend.fetch(record.task_id), record)

    def test_a_record_stored_by_one_client_is_fetched_by_another(
        self, new_result_backend: MakeResultBackend
    ) -> None:
        writer, reader = new_result_backend(), new_result_backend()
        record = _record(unique_name("task"), State.SUCCESS, "shared")
        writer.store(record)
        _assert_same_record(reader.fetch(record.task_id), record)

    def test_fetch_of_an_unknown_id_returns_none(self, result_backend: Any) -> None:
        assert result_backend.fetch(unique_name("never-stored")) is None

    def test_fetch_many_returns_present_ids_and_omits_missing_ones(
        self, result_backend: Any
    ) -> None:
        present = [_record(unique_name("task"), State.SUCCESS, i) for i in range(3)]
        for record in present:
            result_backend.store(record)
        missing = [unique_name("missing") for _ in range(2)]
        ids = [present[0].task_id, missing[0], present[1].task_id, missing[1], present[2].task_id]
        found = result_backend.fetch_many(ids)
        assert set(found) == {r.task_id for r in present}
        for record in present:
            _assert_same_record(found[record.task_id], record)

    def test_fetch_many_of_no_ids_returns_an_empty_mapping(self, result_backend: Any) -> None:
        assert dict(result_backend.fetch_many([])) == {}

    def test_fetch_many_returns_five_hundred_records(self, result_backend: Any) -> None:
        prefix = unique_name("many")
        records = [_record(f"{prefix}-{i}", State.SUCCESS, i) for i in range(500)]
        for record in records:
            result_backend.store(record)
        found = result_backend.fetch_many([r.task_id for r in records])
        assert len(found) == 500
        assert all(found[r.task_id].result == r.result for r in records)

    def test_forget_deletes_the_record_and_is_idempotent(self, result_backend: Any) -> None:
        record = _record(unique_name("task"), State.SUCCESS, "bye")
        result_backend.store(record)
        result_backend.forget(record.task_id)
        assert result_backend.fetch(record.task_id) is None
        result_backend.forget(record.task_id)
        result_backend.forget(unique_name("never-stored"))
        assert result_backend.fetch(record.task_id) is None

    def test_a_forgotten_success_can_be_stored_again(self, result_backend: Any) -> None:
        task_id = unique_name("task")
        result_backend.store(_record(task_id, State.SUCCESS, "first"))
        result_backend.forget(task_id)
        second = _record(task_id, State.SUCCESS, "second")
        result_backend.store(second)
        _assert_same_record(result_backend.fetch(task_id), second)

    @pytest.mark.parametrize(
        "earlier", [State.STARTED, State.RETRY, State.FAILURE], ids=lambda s: s.value
    )
    def test_a_stored_non_success_state_is_replaced_by_a_later_store(
        self, result_backend: Any, earlier: State
    ) -> None:
        task_id = unique_name("task")
        result_backend.store(_record(task_id, earlier, _STATE_RESULTS[earlier]))
        later = _record(task_id, State.SUCCESS, "done", traceback=None)
        result_backend.store(later)
        _assert_same_record(result_backend.fetch(task_id), later)

    @pytest.mark.parametrize(
        "duplicate",
        [State.FAILURE, State.RETRY, State.STARTED, State.SUCCESS],
        ids=lambda s: s.value,
    )
    def test_a_stored_success_is_never_replaced_by_a_redelivered_duplicate(
        self, result_backend: Any, duplicate: State
    ) -> None:
        task_id = unique_name("task")
        success = _record(task_id, State.SUCCESS, {"first": True})
        result_backend.store(success)
        result_backend.store(_record(task_id, duplicate, _STATE_RESULTS[duplicate] or "dup"))
        _assert_same_record(result_backend.fetch(task_id), success)

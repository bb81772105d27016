"""Ids are checked when a task is sent, not when a worker meets them (issue 13, item 4):
a task id or group id given by the caller must be a non-empty ``str`` of valid Unicode
without NUL, at most 1024 bytes, on every app; when the message wants a result, it must
also be an id the result backend can hold (its ``validate_task_id``, no I/O). A refused id
raises ``ConfigurationError`` from ``apply_async`` and nothing is published; an app whose
results are ignored never builds its backend for this check."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import App
from conveyor.core.errors import ConfigurationError

BAD_IDS: list[Any] = [
    123,
    b"bytes-id",
    {"$ne": None},
    "",
    "nul\x00inside",
    "lone\udcffsurrogate",
    "x" * 1025,
]


def _app(**settings: Any) -> App:
    app = App("ids", broker="memory://", backend="memory://", **settings)

    @app.task(name="ids.echo")
    def echo(x: int) -> int:
        return x

    return app


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda v: repr(v)[:16])
@pytest.mark.parametrize("ignore_result", [False, True])
def test_a_task_id_no_store_can_hold_is_refused_at_apply_async(
    bad: Any, ignore_result: bool
) -> None:
    app = _app()
    try:
        with pytest.raises(ConfigurationError, match="task id"):
            app.send_task("ids.echo", (1,), task_id=bad, ignore_result=ignore_result)
        assert app.broker.size("celery") == 0
    finally:
        app.close()


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda v: repr(v)[:16])
@pytest.mark.parametrize("ignore_result", [False, True])
def test_a_group_id_no_store_can_hold_is_refused_at_apply_async(
    bad: Any, ignore_result: bool
) -> None:
    app = _app()
    try:
        with pytest.raises(ConfigurationError, match="group id"):
            app.send_task("ids.echo", (1,), group_id=bad, ignore_result=ignore_result)
        with pytest.raises(ConfigurationError, match="group id"):
            app.send_many("ids.echo", [(1,), (2,)], group_id=bad, ignore_result=ignore_result)
        assert app.broker.size("celery") == 0
    finally:
        app.close()


def test_good_ids_given_by_the_caller_are_sent_as_given() -> None:
    app = _app()
    try:
        odd = "a task id with spaces, ünïcode and : / ?"
        result = app.send_task("ids.echo", (1,), task_id=odd, group_id="g" * 1024)
        assert result.id == odd
        assert app.broker.size("celery") == 1
    finally:
        app.close()


def test_ids_of_a_message_without_result_never_build_the_result_backend() -> None:
    """The backend URL names no registered store: building it would fail."""
    app = App("ids", broker="memory://", backend="nosuchstore://h/")
    try:
        app.send_task("t", task_id="given-id", group_id="given-group", ignore_result=True)
        assert app.broker.size("celery") == 1
        assert app._backend is None
        with pytest.raises(ConfigurationError):
            app.send_task("t", task_id="another-id")  # wants a result: the backend is built
    finally:
        app.close()


def test_the_result_backends_own_rules_apply_when_the_message_wants_a_result() -> None:
    """A backend that refuses more than the generic rules (here: ids longer than 8 bytes)."""
    app = _app()
    backend = app.backend
    backend.max_id_bytes = 8  # type: ignore[misc]
    try:
        with pytest.raises(ConfigurationError, match="at most 8"):
            app.send_task("ids.echo", (1,), task_id="nine-byte")
        with pytest.raises(ConfigurationError, match="group id refused by the result backend"):
            app.send_task("ids.echo", (1,), group_id="nine-byte")
        assert app.broker.size("celery") == 0
        app.send_task("ids.echo", (1,), task_id="nine-byte", ignore_result=True)
        assert app.broker.size("celery") == 1
    finally:
        app.close()

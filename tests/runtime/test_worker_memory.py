"""The worker on the memory implementations: delivery rules, retries, failures, bad input."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from conveyor import App, Envelope
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.runtime.exceptions import TaskRevokedError
from conveyor.runtime.result import GetTimeout
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually


def test_task_round_trip_returns_the_value(app: App, run_worker: Callable[..., Worker]) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    run_worker()
    assert add.delay(4, 4).get(timeout=10) == 8
    assert add.apply_async((1,), {"y": 2}).get(timeout=10) == 3


def test_default_task_name_is_module_dot_function(app: App) -> None:
    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    assert mul.name == f"{__name__}.test_default_task_name_is_module_dot_function.<locals>.mul"
    assert mul(2, 3) == 6  # calling runs locally


def test_failure_propagates_with_type_and_traceback(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task
    def explode(word: str) -> None:
        raise ValueError(f"boom {word}")

    run_worker()
    result = explode.delay("now")
    with pytest.raises(ValueError, match="boom now"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    assert result.failed()
    assert result.traceback is not None
    assert "explode" in result.traceback
    value = result.get(timeout=1, propagate=False)
    assert isinstance(value, ValueError)


def test_unknown_exception_type_becomes_task_error(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    from conveyor.core.errors import TaskError

    @app.task
    def raise_custom() -> None:
        class LocalOnly(Exception):
            pass

        raise LocalOnly("hidden type")

    run_worker()
    with pytest.raises((TaskError, Exception)) as info:
        raise_custom.delay().get(timeout=10)
    assert "hidden type" in str(info.value)


def test_retry_with_countdown_runs_again_until_success(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    attempts: list[int] = []

    @app.task(bind=True, max_retries=5)
    def flaky(self: Any) -> int:
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0.05, exc=RuntimeError("not yet"))
        return int(self.request.retries)

    run_worker()
    assert flaky.delay().get(timeout=10) == 2
    assert attempts == [0, 1, 2]


def test_autoretry_with_backoff_gives_up_after_max_retries(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    calls: list[float] = []

    @app.task(autoretry_for=(KeyError,), max_retries=2, retry_backoff=0.05, retry_jitter=False)
    def always_missing() -> None:
        calls.append(time.monotonic())
        raise KeyError("missing")

    run_worker()
    with pytest.raises(KeyError):
        always_missing.delay().get(timeout=10)
    assert len(calls) == 3
    # exponential backoff: the second gap is at least the first (0.05 s then 0.1 s)
    assert calls[1] - calls[0] >= 0.05
    assert calls[2] - calls[1] >= 0.1


def test_countdown_is_held_by_the_broker_until_due(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    ran_at: list[float] = []

    @app.task
    def stamp() -> None:
        ran_at.append(time.time())

    run_worker()
    sent = time.time()
    stamp.apply_async(countdown=0.5).get(timeout=10)
    assert ran_at
    assert ran_at[0] - sent >= 0.5


def test_expired_task_is_revoked_without_running(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    ran: list[int] = []

    @app.task
    def never() -> None:
        ran.append(1)

    result = never.apply_async(expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    run_worker()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    assert ran == []


def test_ten_thousand_expired_tasks_do_not_starve_fresh_work(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task
    def work(i: int) -> int:
        return i

    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    for i in range(10_000):
        work.apply_async((i,), expires=past)
    fresh = work.delay(-1)
    run_worker(concurrency=4)
    assert fresh.get(timeout=60) == -1


def test_ignore_result_stores_nothing(app: App, run_worker: Callable[..., Worker]) -> None:
    done = threading.Event()

    @app.task(ignore_result=True)
    def quiet() -> int:
        done.set()
        return 1

    run_worker()
    result = quiet.delay()
    assert done.wait(10)
    worker_idle = eventually(lambda: app.broker.size("celery") == 0, 5)
    assert worker_idle
    assert result.state == "PENDING"


def test_get_times_out_when_no_worker_runs(app: App) -> None:
    @app.task
    def slow() -> None:
        return None

    with pytest.raises(GetTimeout):
        slow.delay().get(timeout=0.2)


def test_long_task_is_not_redelivered_while_its_worker_lives(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    runs: list[str] = []

    @app.task(bind=True)
    def long_one(self: Any) -> int:
        runs.append(self.request.id)
        time.sleep(3.0)  # three leases of 1 s: the heartbeat must keep it held
        return len(runs)

    run_worker(concurrency=2)
    assert long_one.delay().get(timeout=20) == 1
    assert len(runs) == 1


def _raw_publish(app: App, envelope: Envelope, queue: str = "celery") -> None:
    app.broker.publish(envelope, queue=queue)


def test_unknown_task_is_dead_lettered_with_a_failure_result(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task
    def known() -> str:
        return "ok"

    task_id = str(uuid.uuid4())
    _raw_publish(app, build_envelope(TaskMessage(task="nobody.knows", id=task_id)))
    run_worker()
    result = app.AsyncResult(task_id)
    eventually(lambda: result.state == "FAILURE", 10)
    assert "nobody.knows" in str(result.result)
    dlq = app.broker.dead_letter_queue("celery")
    eventually(lambda: app.broker.size(dlq) == 1, 5)
    assert known.delay().get(timeout=10) == "ok"  # the worker keeps running


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x00\xff not json", "application/json"),
        (b'[[1, 2], {"a": 1}]', "application/json"),  # two items: kills a Celery worker
        (b'{"truncated": ', "application/json"),
        (b"\x80\x04\x95pickle", "application/x-python-serialize"),
        (b"<xml/>", "application/xml"),
    ],
    ids=["random-bytes", "two-item-body", "truncated-json", "pickle", "unknown-type"],
)
def test_bad_messages_are_dead_lettered_and_the_worker_survives(
    app: App, run_worker: Callable[..., Worker], body: bytes, content_type: str
) -> None:
    @app.task(name="rt.ok")
    def ok() -> str:
        return "ok"

    task_id = str(uuid.uuid4())
    bad = Envelope(
        id=task_id,
        body=body,
        content_type=content_type,
        headers={"task": "rt.ok", "id": task_id, "lang": "py"},
    )
    _raw_publish(app, bad)
    run_worker()
    dlq = app.broker.dead_letter_queue("celery")
    eventually(lambda: app.broker.size(dlq) == 1, 10)
    assert app.AsyncResult(task_id).state == "PENDING"  # refused: no result written
    assert ok.delay().get(timeout=10) == "ok"


def test_oversized_message_is_dead_lettered(app: App, run_worker: Callable[..., Worker]) -> None:
    app.conf.worker_max_message_size = 1024

    @app.task(name="rt.big")
    def big(blob: str) -> int:
        return len(blob)

    result = big.delay("x" * 4096)
    small = big.delay("x")
    run_worker()
    assert small.get(timeout=10) == 1
    eventually(lambda: app.broker.size(app.broker.dead_letter_queue("celery")) == 1, 10)
    assert result.state == "PENDING"  # refused: no result written


def test_poison_message_is_dead_lettered_after_max_deliveries(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    app.conf.worker_max_deliveries = 2

    @app.task(name="rt.poison")
    def poison() -> None:
        return None

    # Simulate a message whose consumers keep dying: deliver it and give it back 3 times.
    result = poison.delay()
    for _ in range(3):
        (delivery,) = app.broker.receive("celery", timeout=5)
        app.broker.reject(delivery, requeue=True)
    run_worker()
    eventually(lambda: result.state == "FAILURE", 10)
    assert app.broker.size(app.broker.dead_letter_queue("celery")) == 1


def test_eta_message_from_a_client_without_broker_delay_is_deferred_not_held(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    """A Celery client publishes ETA tasks at once; the worker hands them back to the broker
    with the remaining delay instead of holding them in memory."""
    ran_at: list[float] = []

    @app.task(name="rt.later")
    def later() -> None:
        ran_at.append(time.time())

    task_id = str(uuid.uuid4())
    eta = datetime.now(timezone.utc) + timedelta(seconds=0.6)
    _raw_publish(app, build_envelope(TaskMessage(task="rt.later", id=task_id, eta=eta)))
    worker = run_worker()
    result = app.AsyncResult(task_id)
    eventually(lambda: worker.stats["deferred"] == 1, 5)
    with worker._cond:
        assert not worker._held  # nothing waits in worker memory
    result.get(timeout=10)
    assert ran_at[0] >= eta.timestamp() - 0.01


def test_warm_stop_finishes_running_tasks_and_gives_back_the_rest(app: App) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task(name="rt.block")
    def block(i: int) -> int:
        started.set()
        release.wait(10)
        return i

    results = [block.delay(i) for i in range(6)]
    worker = app.Worker(pool="threads", concurrency=1, prefetch_multiplier=3, receive_timeout=0.1)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert started.wait(10)
    worker.stop()
    release.set()
    thread.join(15)
    assert not thread.is_alive()
    finished = [r for r in results if r.ready()]
    assert len(finished) == 1  # the running one completed
    # the rest went back to the broker: a new worker finishes them all
    worker2 = app.Worker(pool="threads", concurrency=2, receive_timeout=0.1)
    thread2 = threading.Thread(target=worker2.start, daemon=True)
    thread2.start()
    try:
        assert sorted(r.get(timeout=20) for r in results) == list(range(6))
    finally:
        worker2.stop()
        thread2.join(15)


def test_solo_pool_runs_tasks(app: App, run_worker: Callable[..., Worker]) -> None:
    @app.task
    def echo(v: str) -> str:
        return v

    run_worker(pool="solo")
    assert [echo.delay(s).get(timeout=10) for s in ("a", "ü", "漢")] == ["a", "ü", "漢"]


def test_routes_send_tasks_to_their_queue(app: App, run_worker: Callable[..., Worker]) -> None:
    app.conf.task_routes = {"rt.routed.*": {"queue": "special"}}

    @app.task(name="rt.routed.one")
    def routed() -> str:
        return "special"

    result = routed.delay()
    assert app.broker.size("special") == 1
    run_worker(queues=["special"])
    assert result.get(timeout=10) == "special"


def test_rate_limit_spaces_task_starts(app: App, run_worker: Callable[..., Worker]) -> None:
    starts: list[float] = []

    @app.task(name="rt.limited", rate_limit="20/s")
    def limited() -> None:
        starts.append(time.monotonic())

    results = [limited.delay() for _ in range(6)]
    run_worker(concurrency=4)
    for r in results:
        r.get(timeout=10)
    starts.sort()
    # six starts at 20/s need at least five intervals of 50 ms
    assert starts[-1] - starts[0] >= 5 * 0.05 - 0.01


def test_bad_rate_limit_is_a_clear_error() -> None:
    from conveyor.runtime.worker import parse_rate

    assert parse_rate("120/m") == 2.0
    assert parse_rate(None) is None
    with pytest.raises(Exception, match="rate_limit"):
        parse_rate("5/fortnight")

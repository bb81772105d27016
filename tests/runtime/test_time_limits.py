"""Per-message time limits in every pool (issue 13, item 8).

``apply_async(time_limit=..., soft_time_limit=...)`` travels as Celery's ``timelimit``
header ([hard, soft]) and wins over the task's options, which win over ``task_time_limit``
/ ``task_soft_time_limit`` read when the task runs. prefork kills the child at the hard
limit; solo and threads cannot kill a thread, raise ``TimeLimitExceeded`` in the task
instead and say so once at start. Each limited task runs once, the worker keeps serving,
and the stored document is Celery's: ``TimeLimitExceeded(<hard>,)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from failpaths import Runs, make_app, running

from conveyor import App
from conveyor.core.types import State
from conveyor.runtime.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from conveyor.testing.support import eventually

POOLS = ["solo", "threads", "prefork"]


def _tasks(app: App, runs: Runs) -> tuple[Any, Any, Any]:
    @app.task(name="tl.loop", bind=True)
    def loop(self: Any, seconds: float = 20.0) -> str:
        """Busy in Python (short sleeps): a soft limit is seen within ~10 ms."""
        runs.mark(self.request.id)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "soft"
        return "finished"

    @app.task(name="tl.hang", bind=True, time_limit=60.0)
    def hang(self: Any) -> str:
        """Ignores its soft limit; its own hard limit (60 s) is the task default."""
        runs.mark(self.request.id)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            with contextlib.suppress(SoftTimeLimitExceeded):
                time.sleep(0.01)
        return "finished"

    @app.task(name="tl.ok")
    def ok(n: int) -> int:
        return n

    return loop, hang, ok


@pytest.mark.parametrize("pool", POOLS)
def test_per_message_limits_are_enforced_in_every_pool(
    pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    loop, hang, ok = _tasks(app, runs)
    try:
        caplog.set_level(logging.WARNING, logger="conveyor.worker")
        with running(app, pool=pool, concurrency=1) as (worker, thread):
            started = time.monotonic()
            soft = loop.apply_async(soft_time_limit=0.3)
            assert soft.get(timeout=30) == "soft"
            hard = hang.apply_async(time_limit=0.6, soft_time_limit=0.2)  # overrides 60 s
            with pytest.raises(TimeLimitExceeded):
                hard.get(timeout=30)
            assert time.monotonic() - started < 15.0  # neither ran its 20 s
            assert ok.delay(1).get(timeout=30) == 1  # the slot serves on
            assert thread.is_alive()
        assert runs.count(soft.id) == runs.count(hard.id) == 1
        record = app.backend.fetch_many([hard.id])[hard.id]
        assert record.state == State.FAILURE
        assert record.result["exc_type"] == "TimeLimitExceeded"
        assert record.result["exc_message"] == [0.6]
        warned = [r for r in caplog.records if "cannot kill a task" in r.getMessage()]
        assert len(warned) == (0 if pool == "prefork" else 1)
        assert worker.stats["failed"] == 1
    finally:
        app.close()


@pytest.mark.parametrize("pool", POOLS)
def test_settings_changed_after_the_task_was_defined_apply(pool: str, tmp_path: Path) -> None:
    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    loop, _, _ = _tasks(app, runs)
    app.conf.update(task_soft_time_limit=0.3)  # after @app.task, before the worker starts
    try:
        with running(app, pool=pool, concurrency=1):
            assert loop.delay().get(timeout=30) == "soft"
            # the message's own limit still wins over the setting
            assert loop.apply_async((0.5,), soft_time_limit=5.0).get(timeout=30) == "finished"
    finally:
        app.close()


def test_the_hard_limit_warning_is_said_once_at_start_when_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app("memory", tmp_path, task_time_limit=30.0)
    try:
        caplog.set_level(logging.WARNING, logger="conveyor.worker")
        with running(app, pool="threads", concurrency=1):
            pass
        warned = [r.getMessage() for r in caplog.records if "cannot kill" in r.getMessage()]
        assert len(warned) == 1
        assert "task_time_limit" in warned[0]
        assert "threads" in warned[0]
    finally:
        app.close()


def test_solo_in_the_main_thread_interrupts_a_blocking_call_at_the_soft_limit(
    tmp_path: Path,
) -> None:
    """SIGALRM, in the main thread: a task blocked in ``time.sleep`` is interrupted."""
    assert threading.current_thread() is threading.main_thread()
    app = make_app("memory", tmp_path)

    @app.task(name="tl.sleep")
    def sleeper() -> str:
        try:
            time.sleep(20)
        except SoftTimeLimitExceeded:
            return "soft"
        return "slept"

    worker = app.Worker(pool="solo", receive_timeout=0.1)
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            assert worker.wait_started(30)
            started = time.monotonic()
            outcome["value"] = sleeper.apply_async(soft_time_limit=0.3).get(timeout=30)
            outcome["seconds"] = time.monotonic() - started
        finally:
            worker.stop()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        worker.start()  # blocks the main thread until drive() stops it
        driver.join(30)
        assert outcome.get("value") == "soft"
        assert outcome["seconds"] < 10.0
    finally:
        app.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_zero_limits_in_a_message_are_no_limits(pool: str, tmp_path: Path) -> None:
    """0 means "no limit", as in Celery."""
    from conveyor.core.celery import TaskMessage, build_envelope

    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    _loop, _, _ = _tasks(app, runs)
    envelope = build_envelope(TaskMessage(task="tl.loop", id=f"zero-{pool}", args=(0.3,)))
    envelope = dataclasses.replace(envelope, headers={**envelope.headers, "timelimit": [0, 0]})
    try:
        app.broker.publish(envelope, queue="celery")
        with running(app, pool=pool, concurrency=1) as (_, thread):
            assert app.AsyncResult(envelope.id).get(timeout=30) == "finished"
            assert thread.is_alive()
        assert runs.count(envelope.id) == 1
    finally:
        app.close()


@pytest.mark.parametrize(
    "timelimit",
    [[-1, None], [float("nan"), None], [1e300, 1e300], [None, -5]],
    ids=["negative", "nan", "absurd", "negative-soft"],
)
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_nonsense_limits_in_a_message_refuse_it_and_the_worker_goes_on(
    pool: str, timelimit: list[Any], tmp_path: Path
) -> None:
    """A foreign client's nonsense limits: the message is refused as undecodable (running it
    without the limit its sender asked for would be wrong; conveyor.core.celery), so it is
    dead-lettered unrun, and the worker goes on serving."""
    from conveyor.core.celery import TaskMessage, build_envelope

    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    _loop, _, ok = _tasks(app, runs)
    envelope = build_envelope(TaskMessage(task="tl.loop", id=f"odd-{pool}", args=(0.3,)))
    # as a foreign client could send them
    envelope = dataclasses.replace(envelope, headers={**envelope.headers, "timelimit": timelimit})
    try:
        app.broker.publish(envelope, queue="celery")
        with running(app, pool=pool, concurrency=1) as (_, thread):
            assert ok.delay(5).get(timeout=30) == 5
            eventually(
                lambda: app.broker.size(app.broker.dead_letter_queue("celery")) == 1,
                30,
                message="the message is dead-lettered",
            )
            assert thread.is_alive()
        assert runs.count(envelope.id) == 0
        assert app.backend.fetch(envelope.id) is None
    finally:
        app.close()


def test_a_limit_that_is_not_a_number_is_refused_at_send(tmp_path: Path) -> None:
    app = make_app("memory", tmp_path)
    try:
        for bad in (-1.0, 0, float("nan"), float("inf"), "10", True):
            with pytest.raises(Exception, match="positive number of seconds"):
                app.send_task("tl.any", time_limit=bad)
    finally:
        app.close()


def test_a_task_stopped_by_its_hard_limit_never_disturbs_the_next_one_in_its_thread(
    tmp_path: Path,
) -> None:
    """Attack on the threads pool's asynchronous exceptions: tasks that end right at their
    limits, one after the other, in one slot. No limit may fire into the next task."""
    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")

    @app.task(name="tl.edge", bind=True)
    def edge(self: Any, seconds: float) -> str:
        runs.mark(self.request.id)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass  # busy: the exception lands at once
        return "done"

    try:
        with running(app, pool="threads", concurrency=1) as (_, thread):
            results = [
                edge.apply_async((0.05,), time_limit=0.05 + (i % 5) * 0.002) for i in range(40)
            ]
            normal = [edge.apply_async((0.01,)) for _ in range(20)]
            eventually(lambda: all(r.ready() for r in results + normal), 60, message="all ended")
            states = [r.state for r in results]
            assert set(states) <= {"SUCCESS", "FAILURE"}
            assert all(r.get(timeout=5) == "done" for r in normal)  # no stray limit in them
            assert thread.is_alive()
        assert all(runs.count(r.id) == 1 for r in results + normal)
    finally:
        app.close()


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_the_cli_time_limit_flags_apply_to_tasks_without_their_own(
    pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``conveyor worker --soft-time-limit`` (Celery's flag) on the embedded SQLite stores.
    The task sleeps in C: SIGALRM (prefork children, solo in the main thread) interrupts it;
    in the threads pool it would see the exception only when its 20 s sleep returns."""
    import os
    import signal
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["CONVEYOR_BROKER_URL"] = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    env["CONVEYOR_RESULT_BACKEND"] = f"db+sqlite:///{tmp_path / 'results.db'}"
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    for key in ("CONVEYOR_BROKER_URL", "CONVEYOR_RESULT_BACKEND"):
        monkeypatch.setenv(key, env[key])
    import xp_app

    markers = tmp_path / "markers"
    markers.mkdir()
    result = xp_app.work.delay(str(markers), 20.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli", "-A", "xp_app", "worker", "-P", pool, "-c", "1",
         "--soft-time-limit", "0.5"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(SoftTimeLimitExceeded):
            result.get(timeout=60)
        assert time.monotonic() - started < 15.0
        assert len(list(markers.iterdir())) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        xp_app.app.close()

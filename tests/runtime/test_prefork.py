"""The prefork pool: tasks run in child processes; time limits are enforced there."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from conveyor import App
from conveyor.runtime.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from conveyor.runtime.worker import Worker


def test_prefork_runs_tasks_in_child_processes(app: App, run_worker: Callable[..., Worker]) -> None:
    @app.task(name="pf.pid")
    def pid() -> int:
        return os.getpid()

    run_worker(pool="prefork", concurrency=2)
    pids = {pid.delay().get(timeout=20) for _ in range(6)}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def test_hard_time_limit_kills_the_child_and_fails_the_task(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task(name="pf.hang", time_limit=0.5)
    def hang() -> None:
        time.sleep(30)

    @app.task(name="pf.after")
    def after() -> str:
        return "alive"

    run_worker(pool="prefork", concurrency=1)
    with pytest.raises(TimeLimitExceeded):
        hang.delay().get(timeout=20)
    assert after.delay().get(timeout=20) == "alive"  # a fresh child took over


def test_soft_time_limit_raises_inside_the_task(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task(name="pf.soft", soft_time_limit=0.3)
    def soft() -> str:
        try:
            time.sleep(10)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "not interrupted"

    run_worker(pool="prefork", concurrency=1)
    assert soft.delay().get(timeout=20) == "cleaned up"


def test_child_killed_mid_task_gives_the_task_back(
    app: App, run_worker: Callable[..., Worker]
) -> None:
    @app.task(name="pf.suicide", bind=True)
    def suicide(self) -> str:  # type: ignore[no-untyped-def]
        if not self.request.redelivered:
            os.kill(os.getpid(), 9)  # the child dies mid-task, as under the OOM killer
        return "second time lucky"

    run_worker(pool="prefork", concurrency=1)
    assert suicide.delay().get(timeout=30) == "second time lucky"

"""SIGTERM to the worker's whole process group (systemd's default ``KillMode=control-group``,
Ctrl-C in a terminal) is a warm shutdown in every pool: prefork children leave the signal
to the parent, the running tasks finish, the waiting ones go back to the broker, and each
task runs exactly once across this worker and the next. Embedded SQLite stores, CLI workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import App
from conveyor.testing.support import eventually

HERE = Path(__file__).resolve().parent
TASKS = 6
CONCURRENCY = 2


def _conveyor_cmd() -> list[str]:
    script = Path(sys.executable).with_name("conveyor")
    return [str(script)] if script.exists() else [sys.executable, "-m", "conveyor.cli"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = dict(os.environ)
    values["CONVEYOR_BROKER_URL"] = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    values["CONVEYOR_RESULT_BACKEND"] = f"db+sqlite:///{tmp_path / 'results.db'}"
    values["PYTHONPATH"] = os.pathsep.join([str(HERE), values.get("PYTHONPATH", "")])
    return values


@pytest.fixture
def client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.setenv("CONVEYOR_BROKER_URL", env["CONVEYOR_BROKER_URL"])
    monkeypatch.setenv("CONVEYOR_RESULT_BACKEND", env["CONVEYOR_RESULT_BACKEND"])
    import xp_app

    yield xp_app.app
    xp_app.app.close()


def _start(env: dict[str, str], cwd: Path, pool: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_conveyor_cmd(), "-A", "xp_app", "worker", "-l", "info", "-P", pool,
         "-c", str(CONCURRENCY)],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_sigterm_to_the_process_group_is_a_warm_shutdown_and_nothing_runs_twice(
    pool: str, env: dict[str, str], client: App, tmp_path: Path
) -> None:
    from xp_app import work

    markers = tmp_path / "markers"
    markers.mkdir()
    results = [work.delay(str(markers), 2.0) for _ in range(TASKS)]
    running = 1 if pool == "solo" else CONCURRENCY
    first = _start(env, tmp_path, pool)
    try:
        eventually(lambda: len(list(markers.iterdir())) >= running, 60, message="tasks are running")
        os.killpg(first.pid, signal.SIGTERM)  # the worker and every child, as systemd does
        assert first.wait(60) == 0
        started = {path.name.split(".")[0] for path in markers.iterdir()}
        finished = {r.id for r in results if r.ready()}
        # every task started before the signal finished there, once; none was cut short
        assert len(started) >= running
        assert finished == started
        assert all(r.get(timeout=1) == 1 for r in results if r.id in finished)
    finally:
        _end(first)
    second = _start(env, tmp_path, "threads")
    try:
        assert [r.get(timeout=60) for r in results] == [1] * TASKS  # each ran exactly once
        assert len(list(markers.iterdir())) == TASKS
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        try:
            second.wait(60)
        finally:
            _end(second)

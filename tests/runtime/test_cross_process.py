"""The runtime across processes on the embedded SQLite default: the CLI worker, SIGKILL
mid-task, and warm shutdown. These are the promises `make demo` users rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import App
from conveyor.testing.support import eventually

HERE = Path(__file__).resolve().parent


def _conveyor_cmd() -> list[str]:
    script = Path(sys.executable).with_name("conveyor")
    return [str(script)] if script.exists() else [sys.executable, "-m", "conveyor.cli"]


class Workers:
    """Starts worker subprocesses and always stops them."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, app_spec: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*_conveyor_cmd(), "-A", app_spec, "worker", "-l", "info", *args],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CONVEYOR_BROKER_URL"] = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    env["CONVEYOR_RESULT_BACKEND"] = f"db+sqlite:///{tmp_path / 'results.db'}"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def workers(sqlite_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(sqlite_env, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def client(sqlite_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.setenv("CONVEYOR_BROKER_URL", sqlite_env["CONVEYOR_BROKER_URL"])
    monkeypatch.setenv("CONVEYOR_RESULT_BACKEND", sqlite_env["CONVEYOR_RESULT_BACKEND"])
    import xp_app

    yield xp_app.app
    xp_app.app.close()


def test_the_tutorial_flow_works_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tasks.py with App(...) and @app.task; `conveyor -A tasks worker -l info` in another
    process; add.delay(4, 4).get(timeout=10) == 8."""
    broker = f"sqla+sqlite:///{tmp_path / 'b.db'}"
    backend = f"db+sqlite:///{tmp_path / 'r.db'}"
    (tmp_path / "tasks.py").write_text(
        textwrap.dedent(
            f"""
            from conveyor import App

            app = App('tasks', broker={broker!r}, backend={backend!r})

            @app.task
            def add(x, y):
                return x + y
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    worker = subprocess.Popen(
        [*_conveyor_cmd(), "-A", "tasks", "worker", "-l", "info"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("CONVEYOR_BROKER_URL", "CONVEYOR_RESULT_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    try:
        import tasks  # type: ignore[import-not-found]

        assert tasks.add.delay(4, 4).get(timeout=30) == 8
        tasks.app.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        sys.modules.pop("tasks", None)


def test_worker_killed_mid_task_the_task_runs_again_and_completes(
    workers: Workers, client: App, tmp_path: Path
) -> None:
    from xp_app import work

    markers = tmp_path / "markers"
    markers.mkdir()
    first = workers.start("xp_app", "-P", "threads", "-c", "1")
    result = work.delay(str(markers), 1.0)
    eventually(lambda: any(markers.iterdir()), 30, message="the task started")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    workers.start("xp_app", "-P", "threads", "-c", "1")
    # The lease (2 s) lapses, the second worker gets it redelivered and completes it.
    assert result.get(timeout=60) == 2
    assert len(list(markers.glob(f"{result.id}.*"))) == 2


def test_warm_shutdown_loses_nothing(workers: Workers, client: App, tmp_path: Path) -> None:
    from xp_app import work

    markers = tmp_path / "markers"
    markers.mkdir()
    results = [work.delay(str(markers), 0.2) for _ in range(30)]
    first = workers.start("xp_app", "-P", "threads", "-c", "2")
    eventually(lambda: sum(r.ready() for r in results) >= 3, 60, message="three tasks done")
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    done_by_first = sum(r.ready() for r in results)
    assert done_by_first < 30, "the first worker should not have had time to finish all"
    workers.start("xp_app", "-P", "threads", "-c", "2")
    assert all(r.get(timeout=60) == 1 for r in results)  # each ran exactly once

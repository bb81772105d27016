"""A worker started while its broker is down waits for it (``broker_connection_retry_on_startup``)
instead of exiting; with retrying off it fails at once. Real ``redis-server`` processes on free
loopback ports, started late on purpose.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

import pytest
from support.redis import free_port, terminating, wait_for_port

from conveyor import App
from conveyor.core.errors import OperationalError
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually


def _app(port: int, **settings: object) -> App:
    url = f"redis://127.0.0.1:{port}/0"
    app = App(
        "startup", broker=url, backend=url, broker_transport_options={"max_retries": 0}, **settings
    )

    @app.task(name="startup.add")
    def add(x: int, y: int) -> int:
        return x + y

    return app


def test_a_worker_started_before_its_broker_waits_then_consumes(
    redis_bin: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    app = _app(port)
    worker = Worker(app, pool="threads", concurrency=1, receive_timeout=0.2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.start()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    caplog.set_level(logging.ERROR, logger="conveyor.runtime.worker")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        eventually(
            lambda: "cannot reach the broker" in caplog.text, 15, message="a retry is logged"
        )
        assert thread.is_alive()  # waiting, not exited
        assert not errors
        argv = [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        proc = subprocess.Popen([*argv, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        with terminating(proc):
            wait_for_port(port)
            assert worker.wait_started(20), "the worker never started consuming"
            result = app.send_task("startup.add", (2, 3))
            assert result.get(timeout=10) == 5
            worker.stop()
            thread.join(10)
    finally:
        worker.stop()
        thread.join(10)
        app.close()
    assert not errors


def test_with_retrying_off_an_unreachable_broker_fails_the_start_at_once() -> None:
    app = _app(free_port(), broker_connection_retry_on_startup=False)
    worker = Worker(app, pool="threads", concurrency=1)
    try:
        with pytest.raises(OperationalError):
            worker.start()
    finally:
        app.close()


def test_retries_at_startup_are_bounded() -> None:
    app = _app(free_port(), broker_connection_max_retries=2)
    worker = Worker(app, pool="threads", concurrency=1)
    try:
        with pytest.raises(OperationalError):
            worker.start()  # 0.5 s + 1.0 s of backoff, then the error
    finally:
        app.close()


def test_a_publish_during_a_short_outage_is_retried_and_lands(
    redis_bin: str, tmp_path: Path
) -> None:
    port = free_port()
    app = _app(
        port,
        task_publish_retry_policy={
            "max_retries": 100,
            "interval_start": 0.05,
            "interval_max": 0.05,
        },
    )
    argv = [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    started: list[subprocess.Popen[bytes]] = []
    # The server comes up while send_task is already retrying.
    timer = threading.Timer(
        0.3,
        lambda: started.append(
            subprocess.Popen([*argv, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        ),
    )
    timer.start()
    try:
        result = app.send_task("startup.add", (1, 2), queue="startup-q")
        assert started  # it did wait for the server
        assert app.broker.size("startup-q") == 1
        assert result.id
    finally:
        timer.join()
        app.close()
        for proc in started:
            with terminating(proc):
                pass


def test_with_publish_retry_off_a_lost_connection_raises_at_once() -> None:
    app = _app(free_port(), task_publish_retry=False)
    try:
        with pytest.raises(OperationalError):
            app.send_task("startup.add", (1, 2))
    finally:
        app.close()

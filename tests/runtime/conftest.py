"""Fixtures for runtime tests: an App on the memory implementations and a worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor import App
from conveyor.runtime.worker import Worker


@pytest.fixture
def app() -> Iterator[App]:
    """An app on memory:// (broker and results in this process)."""
    application = App(
        "rt",
        broker="memory://",
        backend="memory://",
        worker_lease_seconds=1.0,
        task_default_retry_delay=0.05,
    )
    yield application
    application.close()


@pytest.fixture
def run_worker(app: App) -> Iterator[Callable[..., Worker]]:
    """Start a worker thread for ``app``; every worker started is stopped after the test."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(**options: Any) -> Worker:
        options.setdefault("pool", "threads")
        options.setdefault("concurrency", 2)
        options.setdefault("receive_timeout", 0.1)
        worker = app.Worker(**options)
        thread = threading.Thread(target=worker.start, daemon=True)
        thread.start()
        assert worker.wait_started(10.0), "worker did not start"
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(15.0)
        assert not thread.is_alive(), "worker thread did not stop"

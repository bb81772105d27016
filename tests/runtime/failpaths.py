"""Helpers for the failure-path tests (tests/runtime/test_failure_paths*.py, test_time_limits*):
execution counting that works across prefork children, apps on the stores under test, and
a worker thread that is always stopped.

Executions are counted outside the system under test: every run of a task appends
``<task id>\\n`` to a file of its process (``O_APPEND``, one ``write``), so runs in forked
children count too.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conveyor import App
from conveyor.runtime.worker import Worker


class Runs:
    """Counts task executions in ``folder`` (one file per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def mark(self, key: str) -> None:
        path = self.folder / f"{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{key.encode('utf-8', 'backslashreplace').decode()}\n".encode())
        finally:
            os.close(fd)

    def counts(self) -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()
        for path in self.folder.glob("*.log"):
            for line in path.read_text().splitlines():
                if line:
                    found[line] += 1
        return found

    def count(self, key: str) -> int:
        return self.counts()[key.encode("utf-8", "backslashreplace").decode()]


def make_app(store: str, folder: Path, name: str = "fp", **settings: Any) -> App:
    """An app on ``store``: ``memory`` (memory:// broker and results) or ``sqlite`` (the
    embedded default's implementations, SQLite files in ``folder``)."""
    settings.setdefault("worker_lease_seconds", 1.0)
    if store == "memory":
        return App(name, broker="memory://", backend="memory://", **settings)
    if store == "sqlite":
        return App(
            name,
            broker=f"sqla+sqlite:///{folder / 'broker.db'}",
            backend=f"db+sqlite:///{folder / 'results.db'}",
            **settings,
        )
    raise ValueError(store)


@contextlib.contextmanager
def running(app: App, **options: Any) -> Iterator[tuple[Worker, threading.Thread]]:
    """A worker thread for ``app``, warm-stopped (and checked stopped) on the way out."""
    options.setdefault("receive_timeout", 0.1)
    worker = app.Worker(**options)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(30), "worker did not start"
        yield worker, thread
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"


class Unstorable:
    """A return value no result store here can hold: JSON cannot encode it and the memory
    store cannot copy it (it can be pickled, so it reaches a prefork parent)."""

    def __deepcopy__(self, memo: Any) -> Any:
        raise TypeError("an Unstorable cannot be copied")

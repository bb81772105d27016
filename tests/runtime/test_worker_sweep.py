"""Workers delete expired result rows of backends without native expiry (SQL), so that an
embedded SQLite store does not grow for ever (pain point: results that never go away)."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from conveyor import App
from conveyor.core.types import ResultRecord, State
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM celery_taskmeta").fetchone()
    return int(count)


def _app(tmp_path: Path, **settings: object) -> tuple[App, Path]:
    db = tmp_path / "results.sqlite"
    app = App(
        "sweep",
        broker=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        backend=f"db+sqlite:///{db}",
        **settings,
    )
    return app, db


def _store(app: App, ttl: float, count: int) -> None:
    now = datetime.now(timezone.utc)
    for i in range(count):
        record = ResultRecord(task_id=f"t{ttl}-{i}", state=State.SUCCESS, result=i, date_done=now)
        app.backend.store(record, ttl=ttl)


def _run(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert worker.wait_started(10)
    return thread


def test_a_worker_deletes_expired_rows_and_keeps_live_ones(tmp_path: Path) -> None:
    app, db = _app(tmp_path, result_expiry_sweep_interval=0.2)
    try:
        _store(app, ttl=0.05, count=5)  # expire at once
        _store(app, ttl=3600.0, count=3)  # live
        assert _rows(db) == 8
        worker = Worker(app, pool="threads", concurrency=1, receive_timeout=0.2)
        thread = _run(worker)
        try:
            eventually(lambda: _rows(db) == 3, 15, message="expired rows deleted")
        finally:
            worker.stop()
            thread.join(10)
        assert app.backend.fetch("t3600.0-0") is not None
    finally:
        app.close()


def test_no_sweeping_when_turned_off(tmp_path: Path) -> None:
    app, db = _app(tmp_path, result_expiry_sweep_interval=None)
    try:
        _store(app, ttl=0.05, count=2)
        worker = Worker(app, pool="threads", concurrency=1, receive_timeout=0.2)
        assert worker._sweep_interval() is None
        thread = _run(worker)
        worker.stop()
        thread.join(10)
        assert _rows(db) == 2  # invisible (expired) but still on disk, as asked
        assert app.backend.fetch("t0.05-0") is None
    finally:
        app.close()


def test_backends_with_native_expiry_get_no_sweeper(tmp_path: Path) -> None:
    app = App("sweep-mem", broker="memory://", backend="memory://")
    try:
        assert Worker(app, pool="solo")._sweep_interval() is None
    finally:
        app.close()

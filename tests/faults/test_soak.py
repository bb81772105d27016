"""Soak: 100,000 tasks through 4 worker processes on Redis, RabbitMQ and PostgreSQL; every
result present, none lost, duplicates counted, durations measured.

``CONVEYOR_SOAK_TASKS`` changes the count (default 100000; the figures in
docs/reliability.md say which count they came from). A producer thread publishes in batches
(``App.send_many`` where the app has it, else one ``send_task`` per task from 4 threads) while
4 CLI worker processes (threads pool, 4 slots each) consume. When every task has left a marker,
every result is read back (in batches) and must be SUCCESS with the task's return value.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.faults import (
    Markers,
    Target,
    WorkerProcs,
    amqp_shared_lock,
    cleanup_queue,
    record_figures,
    target,
    worker_env,
)

from conveyor.core.types import State
from conveyor.runtime import App
from conveyor.testing.support import eventually, unique_name

SOAK_TASKS = int(os.environ.get("CONVEYOR_SOAK_TASKS", "100000"))
WORKERS = 4
CONCURRENCY = 4
BATCH = 1000
DEADLINE = float(os.environ.get("CONVEYOR_SOAK_DEADLINE", "1500"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE + 300)]


def _publish(app: App, queue: str, total: int, ids: list[str], errors: list[BaseException]) -> None:
    try:
        send_many = getattr(app, "send_many", None)
        if send_many is not None:
            for start in range(0, total, BATCH):
                stop = min(total, start + BATCH)
                results = send_many("faults.work", [(n,) for n in range(start, stop)], queue=queue)
                ids[start:stop] = [r.id for r in results]
            return

        def one(index: int) -> None:
            for n in range(index, total, 4):
                ids[n] = app.send_task("faults.work", (n,), queue=queue).id

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException as exc:
        errors.append(exc)


def _forget_results(where: Target, app: App, ids: list[str]) -> None:
    """Delete the soak's results so runs do not pile up rows and keys on shared servers."""
    if where.name in ("redis", "amqp"):
        client: Any = app.backend.client if hasattr(app.backend, "client") else None
        if client is None:
            import redis

            client = redis.Redis.from_url(where.backend)
        for start in range(0, len(ids), BATCH):
            client.delete(*[f"celery-task-meta-{i}" for i in ids[start : start + BATCH]])
        return
    import sqlalchemy as sa

    engine = sa.create_engine(where.backend.removeprefix("db+"))
    try:
        table = sa.table("celery_taskmeta", sa.column("task_id"))
        with engine.begin() as conn:
            for start in range(0, len(ids), BATCH):
                conn.execute(
                    sa.delete(table).where(table.c.task_id.in_(ids[start : start + BATCH]))
                )
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", ["redis", "amqp", "postgres"])
def test_soak_every_task_completes_with_its_result(name: str, tmp_path: Path) -> None:
    where = target(name, tmp_path)
    total = SOAK_TASKS
    queue = unique_name(f"soak-{name}")
    markers = Markers(tmp_path / "markers")
    env = worker_env(where.broker, where.backend, markers.folder, FAULT_LEASE="30")
    workers = WorkerProcs(env, tmp_path)
    producer = App("soak-producer", broker=where.broker, backend=where.backend)
    ids: list[str] = [""] * total
    errors: list[BaseException] = []
    with amqp_shared_lock(name):
        try:
            producer.broker.declare_queue(queue)
            for _ in range(WORKERS):
                workers.start(pool="threads", concurrency=CONCURRENCY, extra=("-Q", queue))
            began = time.monotonic()
            publisher = threading.Thread(
                target=_publish, args=(producer, queue, total, ids, errors)
            )
            publisher.start()
            publisher.join(DEADLINE)
            published = time.monotonic() - began
            assert not errors, errors
            assert all(ids)

            def progress() -> bool:
                return len(markers.counts()) >= total

            eventually(
                progress, DEADLINE, interval=1.0, max_interval=2.0,
                message=f"all {total} tasks ran",
            )  # fmt: skip
            drained = time.monotonic() - began
            runs = markers.counts()
            wrong: list[str] = []
            for start in range(0, total, BATCH):
                chunk = ids[start : start + BATCH]
                records = producer.backend.fetch_many(chunk)
                for offset, task_id in enumerate(chunk):
                    record = records.get(task_id)
                    if (
                        record is None
                        or record.state != State.SUCCESS
                        or record.result != start + offset
                    ):
                        wrong.append(task_id)
            checked = time.monotonic() - began
            alive = all(p.poll() is None for p in workers.procs)
        finally:
            workers.stop_all()
            try:
                if all(ids):
                    _forget_results(where, producer, ids)
            finally:
                producer.close()
                cleanup_queue(where.broker, queue)
    unique = sum(1 for i in ids if runs[i])
    duplicates = sum(runs.values()) - unique
    record_figures(
        f"soak/{name}",
        kind="soak",
        broker=name,
        tasks=total,
        workers=WORKERS,
        moved=total,
        lost=total - unique,
        results_missing=len(wrong),
        duplicated=duplicates,
        publish_seconds=round(published, 1),
        seconds=round(drained, 1),
        tasks_per_second=round(total / drained, 1),
        check_seconds=round(checked - drained, 1),
    )
    assert alive, "a worker died during the soak"
    assert unique == total
    assert not wrong, f"{len(wrong)} results missing or wrong, e.g. {wrong[:3]}"

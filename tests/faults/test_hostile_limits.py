"""Per-message time limits in every pool, through CLI workers (issue 13, class 8).

``apply_async(time_limit=..., soft_time_limit=...)`` (Celery's ``timelimit`` header) and the
same header in a Celery-shaped message: a task that catches its soft limit returns early; one
that does not fails with ``SoftTimeLimitExceeded``; one that ignores its soft limit is
stopped at the hard one (prefork kills the child, solo and threads raise
``TimeLimitExceeded`` in the task); a limit longer than the broker lease holds (the lease is
renewed while the task runs, so it is not delivered again). Each task runs exactly once,
the worker serves on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hostile_support import (
    CliWorker,
    Runs,
    celery_envelope,
    cleanup,
    figures,
    hostile_app,
    place,
    server_lock,
    settled,
)

from conveyor.core.types import State
from conveyor.testing.support import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CASES = [("postgres", "solo"), ("redis", "threads"), ("amqp", "prefork"), ("mongodb", "prefork")]


@pytest.mark.parametrize(("broker", "pool"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_per_message_time_limits_stop_the_task_once_in_every_pool(
    broker: str, pool: str, tmp_path: Path
) -> None:
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"limits-{broker}")
    settings = {"worker_lease_seconds": 1.0}
    client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
    workers = CliWorker(where, runs, tmp_path, settings=settings)
    started = time.monotonic()
    with server_lock(where):
        try:
            client.broker.declare_queue(queue)
            caught = tasks["busy"].apply_async((20.0,), soft_time_limit=0.3)
            soft = tasks["spin"].apply_async((20.0,), soft_time_limit=0.3)
            hard = tasks["stubborn"].apply_async((20.0,), time_limit=0.8, soft_time_limit=0.2)
            # longer than three leases: renewed while it runs, never delivered twice
            long = tasks["spin"].apply_async((20.0,), soft_time_limit=3.5)
            celery_id = unique_name("celery")
            celery = celery_envelope("h.stubborn", celery_id, args=(20.0,))
            celery = celery.__class__(
                **{**_fields(celery), "headers": {**celery.headers, "timelimit": [0.6, 0.2]}}
            )
            client.broker.publish(celery, queue=queue)
            proc = workers.start(queue=queue, pool=pool, concurrency=2)
            assert caught.get(timeout=60) == "soft"
            for result, exc_type in (
                (soft, "SoftTimeLimitExceeded"),
                (hard, "TimeLimitExceeded"),
                (long, "SoftTimeLimitExceeded"),
            ):
                result.get(timeout=60, propagate=False)
                record = client.backend.fetch(result.id)
                assert record is not None
                assert record.state == State.FAILURE
                assert record.result["exc_type"] == exc_type, record.result
            forged = client.AsyncResult(celery_id)
            forged.get(timeout=60, propagate=False)
            assert forged.state == "FAILURE"
            record = client.backend.fetch(celery_id)
            assert record is not None
            assert record.result["exc_type"] == "TimeLimitExceeded"
            elapsed = time.monotonic() - started
            assert elapsed < 30, f"limits took {elapsed:.0f}s: a 20 s task ran out its time?"
            assert tasks["count"].apply_async((1,)).get(timeout=60) == 1  # serves on
            assert proc.poll() is None
            assert settled(client, queue) == (0, 0)
            ids = [caught.id, soft.id, hard.id, long.id, celery_id]
            counts = [runs.count(i) for i in ids]
        finally:
            workers.stop_all()
            client.close()
            cleanup(where, queue)
    figures(
        f"8-time-limits-{pool}", broker, pool=pool, bad_inputs=len(ids),
        executions=sum(counts), duplicated=sum(counts) - len(ids), lost=0,
        seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    assert counts == [1] * len(ids)


def _fields(envelope: Any) -> dict[str, Any]:
    return {name: getattr(envelope, name) for name in envelope.__dataclass_fields__}

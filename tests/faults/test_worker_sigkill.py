"""Workers SIGKILLed mid-task, again and again, on every broker: every task completes, and
duplicate executions are counted and bounded.

Each scenario publishes ``TASKS`` tasks (each sleeps 20-200 ms, so most kills land while tasks
run), starts a CLI worker (``python -m conveyor.cli -A fault_app worker -P <pool> -c 4``),
and ``KILLS`` times waits a random 0.4-1.6 s, SIGKILLs the worker's whole process group
(the worker and, for prefork, its children) and starts a fresh one. The last worker drains
the queue. Then:

* every task has a SUCCESS result and a marker: nothing was lost;
* duplicate executions (markers beyond the first per task) are at most
  ``kills x prefetch_limit``. Why that bound: a task runs twice only if a worker died after
  it started the task and before the broker recorded the ack. A worker holds at most
  ``prefetch_limit = concurrency x worker_prefetch_multiplier`` (4 x 4 = 16) unacked
  deliveries at any moment (RabbitMQ enforces it with basic.qos; the other brokers because
  the worker never claims more), so each kill can send back at most that many started
  tasks. In practice only the tasks running or settling at the kill (<= concurrency) come
  back; the measured figure is recorded.

The markers are lines appended to files (one per process, ``O_APPEND``), outside the system
under test. Leases are 2 s (renewed by the worker's heartbeat), so a dead worker's tasks come
back about 2 s after the kill (at once on RabbitMQ, whose connection closes).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from support.faults import (
    Markers,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KILLS = 4
CONCURRENCY = 4
PREFETCH_MULTIPLIER = 4
PREFETCH_LIMIT = CONCURRENCY * PREFETCH_MULTIPLIER
#: Tasks per broker; the MongoDB-protocol test server claims only ~6-35 messages/s.
TASKS = {"mongodb": 60}
DEFAULT_TASKS = 240
DRAIN_DEADLINE = 240.0

CASES = [
    ("redis", "threads"),
    ("redis", "prefork"),
    ("amqp", "threads"),
    ("amqp", "prefork"),
    ("postgres", "threads"),
    ("postgres", "prefork"),
    ("sqlite", "threads"),
    ("mysql", "threads"),
    ("mongodb", "threads"),
]


@pytest.mark.parametrize(("name", "pool"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_workers_killed_mid_task_lose_nothing_and_duplicates_stay_bounded(
    name: str, pool: str, tmp_path: Path
) -> None:
    where = target(name, tmp_path)
    total = TASKS.get(name, DEFAULT_TASKS)
    rng = random.Random()
    queue = unique_name(f"kill-{name}")
    markers = Markers(tmp_path / "markers")
    env = worker_env(
        where.broker, where.backend, markers.folder, FAULT_PREFETCH=str(PREFETCH_MULTIPLIER)
    )
    workers = WorkerProcs(env, tmp_path)
    producer = App("kill-producer", broker=where.broker, backend=where.backend)
    started = time.monotonic()
    with amqp_shared_lock(name):
        try:
            ids = [
                producer.send_task("faults.work", (i, rng.uniform(0.02, 0.2)), queue=queue).id
                for i in range(total)
            ]
            worker = workers.start(pool=pool, concurrency=CONCURRENCY, extra=("-Q", queue))
            for _ in range(KILLS):
                seen = sum(markers.counts().values())

                def progressed(seen: int = seen) -> bool:
                    # New executions, or none left to run: on a fast server the first
                    # workers may finish every task (the kill then hits an idle worker).
                    counts = markers.counts()
                    return sum(counts.values()) > seen or len(counts) >= total

                eventually(progressed, 90, message="the worker runs tasks before the next kill")
                time.sleep(rng.uniform(0.4, 1.6))  # a random moment to kill at
                workers.kill(worker)
                worker = workers.start(pool=pool, concurrency=CONCURRENCY, extra=("-Q", queue))
            backend = producer.backend

            def done() -> bool:
                records = backend.fetch_many(ids)
                return (
                    all(r is not None and r.state == State.SUCCESS for r in records.values())
                    and len(records) == total
                )

            eventually(
                done, DRAIN_DEADLINE, interval=0.2, max_interval=1.0,
                message=f"all {total} results SUCCESS after {KILLS} kills",
            )  # fmt: skip
            elapsed = time.monotonic() - started
            runs = markers.counts()
        finally:
            workers.stop_all()
            producer.close()
            cleanup_queue(where.broker, queue)
    unique = sum(1 for i in ids if runs[i] >= 1)
    executions = sum(runs[i] for i in ids)
    duplicates = executions - unique
    bound = workers.kills * PREFETCH_LIMIT
    record_figures(
        f"sigkill/{name}/{pool}",
        kind="sigkill",
        broker=name,
        pool=pool,
        tasks=total,
        kills=workers.kills,
        moved=total,
        lost=total - unique,
        duplicated=duplicates,
        duplicate_bound=bound,
        seconds=round(elapsed, 1),
    )
    assert unique == total, f"{total - unique} tasks never ran"
    assert duplicates <= bound, f"{duplicates} duplicate executions > {bound}"

"""Tasks that attack their worker (issue 13, class 3), through CLI worker processes
(``conveyor -A hostile_support worker``) on every broker that another process can reach.

Each worker gets, between good messages:

* tasks raising ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` and a bare
  ``BaseException`` (in solo, the worker's main thread runs them): each FAILURE is stored
  with its type, each ran once, and the one slot goes on serving;
* prefork only: a task that kills its child process once (``os._exit``, as the OOM killer
  would): the child is replaced and the task runs exactly once more; a task that kills its
  child every time: it runs ``worker_max_deliveries`` times, then a FAILURE
  ``WorkerLostError`` is stored and the message is dead-lettered (counted by the worker
  where the broker does not count: RabbitMQ classic queues).

Then the worker process is still alive, serves a fresh message, and stops cleanly on
SIGTERM; nothing is left in the queue.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hostile_support import (
    CliWorker,
    Runs,
    cleanup,
    figures,
    hostile_app,
    place,
    server_lock,
    settled,
)

from conveyor.core.types import State
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAX_DELIVERIES = 2
LEAVES = ["exit", "interrupt", "generator", "base"]
EXC_TYPES = {
    "exit": "SystemExit",
    "interrupt": "KeyboardInterrupt",
    "generator": "GeneratorExit",
    "base": "BaseException",
}
CASES = [
    ("sqlite", "prefork"),
    ("postgres", "prefork"),
    ("mysql", "prefork"),
    ("redis", "prefork"),
    ("amqp", "prefork"),
    ("quorum", "prefork"),
    ("mongodb", "prefork"),
    ("redis", "solo"),
    ("postgres", "solo"),
    ("amqp", "threads"),
    ("mongodb", "solo"),
    ("mysql", "threads"),
]


@pytest.mark.parametrize(("broker", "pool"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_tasks_that_attack_their_worker_fail_once_and_the_worker_serves_on(
    broker: str, pool: str, tmp_path: Path
) -> None:
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"crash-{broker}")
    settings = {"worker_max_deliveries": MAX_DELIVERIES, "worker_lease_seconds": 2.0}
    client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
    workers = CliWorker(where, runs, tmp_path, settings=settings)
    started = time.monotonic()
    with server_lock(where):
        try:
            client.broker.declare_queue(queue)
            good: list[Any] = [tasks["count"].apply_async((0,))]
            leaves = {}
            for how in LEAVES:
                leaves[how] = tasks["leave"].apply_async((how,))
                good.append(tasks["count"].apply_async((len(good),)))
            once = always = None
            if pool == "prefork":
                # values a child cannot send back, or its parent cannot read
                for name in ("unpicklable", "explosive"):
                    leaves[name] = tasks[name].apply_async()
                    good.append(tasks["count"].apply_async((len(good),)))
                once = tasks["die"].apply_async((1,))
                good.append(tasks["count"].apply_async((len(good),)))
                always = tasks["die"].apply_async()
                good.append(tasks["count"].apply_async((len(good),)))
            proc = workers.start(queue=queue, pool=pool, concurrency=2)
            assert [r.get(timeout=120) for r in good] == list(range(len(good)))
            eventually(
                lambda: all(r.state == "FAILURE" for r in leaves.values()), 60,
                message="every BaseException stored as a FAILURE",
            )  # fmt: skip
            if once is not None and always is not None:
                assert once.get(timeout=120) != proc.pid  # ran in a (new) child
                eventually(lambda: always.state == "FAILURE", 120, message="poison failed")
            assert tasks["count"].apply_async((99,)).get(timeout=60) == 99  # still serving
            assert proc.poll() is None, workers.log()[-3000:]
            eventually(lambda: settled(client, queue)[0] == 0, 30, message="queue drained")
            workers.stop_all()
            assert proc.returncode == 0, workers.log()[-3000:]
            backend = client.backend
            for how, result in leaves.items():
                record = backend.fetch(result.id)
                assert record is not None
                assert record.state == State.FAILURE
                if how in EXC_TYPES:
                    assert record.result["exc_type"] == EXC_TYPES[how], record.result
                assert runs.count(result.id) == 1, how
            assert all(runs.count(r.id) == 1 for r in good)
            dead = 0
            if once is not None and always is not None:
                assert runs.count(once.id) == 2  # the crash, then the run that completed
                assert runs.count(always.id) == MAX_DELIVERIES
                record = backend.fetch(always.id)
                assert record is not None
                assert record.result["exc_type"] == "WorkerLostError", record.result
                dead = 1
            assert settled(client, queue) == (0, dead)
            extra = runs.count(once.id) - 1 if once is not None else 0
            executions = sum(runs.counts().values())
        finally:
            workers.stop_all()
            client.close()
            cleanup(where, queue)
    figures(
        f"3-crashes-{pool}", broker, pool=pool, bad_inputs=len(leaves) + (2 if once else 0),
        good=len(good) + 1, executions=executions, crashes=(1 + MAX_DELIVERIES) if once else 0,
        duplicated=extra, lost=0, seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip


@pytest.mark.parametrize(
    "broker",
    [
        "sqlite",
        "postgres",
        "mysql",
        "mongodb",
    ],
)
def test_a_planted_negative_delivery_count_does_not_lift_worker_max_deliveries(
    broker: str, tmp_path: Path
) -> None:
    from hostile_support import Planter, celery_envelope, running

    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"negcount-{broker}")
    app, _ = hostile_app(
        where, runs, task_default_queue=queue, worker_max_deliveries=MAX_DELIVERIES
    )
    poison_id = unique_name("poison")
    planter = Planter(where, app)
    try:
        app.broker.declare_queue(queue)
        planter.plant_envelope(
            queue, celery_envelope("h.die", poison_id), delivery_count=-1_000_000
        )
        with running(app, queues=[queue], pool="prefork", concurrency=1) as (_, thread):

            def over() -> bool:
                state = app.AsyncResult(poison_id).state
                return state == "FAILURE" or runs.count(poison_id) > MAX_DELIVERIES + 2

            eventually(over, 60, message="the poison message dead-lettered")
            assert thread.is_alive()
        executions = runs.count(poison_id)
        assert executions <= MAX_DELIVERIES, f"a poison message ran {executions} times"
    finally:
        planter.close()
        app.close()
        cleanup(where, queue)

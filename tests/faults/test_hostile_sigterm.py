"""SIGTERM to a prefork worker's whole process group mid-task, on every broker another
process can reach (issue 13, class 9): systemd's default ``KillMode=control-group``.

Warm (one SIGTERM to the group): the running tasks finish where they started, the worker
exits 0, the prefetched ones go back to the broker; a second worker runs the rest, and each
task starts exactly once and finishes exactly once across both.

Cold (a second SIGTERM to the group while tasks run): the running tasks are cut short and
given back; each task then finishes exactly once and starts at most twice (one extra start
per task the signal cut short).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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

from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TASKS = 6
SECONDS = 1.5
CASES = [
    ("postgres", "warm"),
    ("mysql", "warm"),
    ("redis", "warm"),
    ("amqp", "warm"),
    ("quorum", "warm"),
    ("mongodb", "warm"),
    ("sqlite", "cold"),
    ("redis", "cold"),
    ("amqp", "cold"),
]


@pytest.mark.parametrize(("broker", "how"), CASES, ids=[f"{b}-{h}" for b, h in CASES])
def test_sigterm_to_the_process_group_of_a_prefork_worker_loses_and_repeats_nothing(
    broker: str, how: str, tmp_path: Path
) -> None:
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"term-{broker}")
    settings = {"worker_lease_seconds": 2.0, "worker_shutdown_timeout": 30.0}
    client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
    workers = CliWorker(where, runs, tmp_path, settings=settings)
    started = time.monotonic()
    with server_lock(where):
        try:
            client.broker.declare_queue(queue)
            results = [tasks["sleep"].apply_async((SECONDS,)) for _ in range(TASKS)]
            ids = [r.id for r in results]
            first = workers.start(queue=queue, pool="prefork", concurrency=2)

            def starts() -> int:
                return sum(runs.count(i) for i in ids)

            eventually(lambda: starts() >= 2, 60, message="two tasks running")
            os.killpg(first.pid, signal.SIGTERM)  # the worker and its children
            if how == "cold":  # the second signal of an impatient operator
                eventually(
                    lambda: "warm shutdown" in workers.log(0), 30, message="warm shutdown began"
                )  # fmt: skip
                os.killpg(first.pid, signal.SIGTERM)
            assert first.wait(60) == 0, workers.log(0)[-3000:]
            cut = sum(1 for i in ids if runs.count(i) > runs.count(f"{i}/done"))
            if how == "warm":
                assert cut == 0, "a warm shutdown cut a running task short"
            second = workers.start(queue=queue, pool="threads", concurrency=2)
            assert [r.get(timeout=120) for r in results] == [1] * TASKS
            assert second.poll() is None
            eventually(lambda: settled(client, queue) == (0, 0), 30, message="drained")
            begun = [runs.count(i) for i in ids]
            done = [runs.count(f"{i}/done") for i in ids]
        finally:
            workers.stop_all()
            client.close()
            cleanup(where, queue)
    figures(
        f"9-sigterm-{how}", broker, pool="prefork", tasks=TASKS, kills=1,
        executions=sum(begun), cut_short=cut, duplicated=sum(begun) - TASKS, lost=0,
        seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    assert done == [1] * TASKS, done
    if how == "warm":
        assert begun == [1] * TASKS, begun
    else:
        assert all(1 <= b <= 2 for b in begun), begun
        assert sum(begun) - TASKS <= cut

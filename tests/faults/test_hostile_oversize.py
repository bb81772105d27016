"""Results larger than the store takes in one value (issue 13, class 1: a value the store
cannot hold is not a transient failure): memcached's 1 MiB item, MongoDB's 16 MiB document,
MariaDB's 16 MiB ``max_allowed_packet``, RabbitMQ's 128 MiB ``max_message_size`` (rpc://).

The task runs once, a minimal FAILURE naming the refusal is stored, the message is acked,
the worker serves on. Taking the refusal for an outage instead holds the message while the
store is retried (``hold_max``, 300 s by default, 3 s here), then gives it back: the task
runs again, up to ``worker_max_deliveries`` times.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hostile_support import (
    Runs,
    backend_place,
    cleanup,
    figures,
    hostile_app,
    place,
    running,
    server_lock,
    settled,
)

from conveyor.core.types import State
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CASES = [
    pytest.param("memcached", 1.5, id="memcached-1.5MiB"),
    pytest.param("mongodb", 17, id="mongodb-17MiB"),
    pytest.param("mysql", 20, id="mysql-20MiB"),
    pytest.param("rpc", 129, id="rpc-129MiB"),
]


@pytest.mark.parametrize(("backend", "mib"), CASES)
def test_a_result_too_large_for_the_store_fails_the_task_once(
    backend: str, mib: float, tmp_path: Path
) -> None:
    # a broker both apps reach: SQLite files (rpc:// needs RabbitMQ: its publishes wait 3 s
    # for a confirm, not 10, to keep the run short)
    if backend == "rpc":
        where = backend_place(backend, tmp_path)
        where = dataclasses.replace(where, broker=f"{where.broker}?operation_timeout=3")
    else:
        where = place("sqlite", tmp_path, backend)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"oversize-{backend}")
    settings = {"worker_max_deliveries": 2, "worker_max_message_size": 256 << 20}
    # The worker has its own app (its own connections), as in production: a store that
    # breaks the worker's connection must not be mistaken for the client's view.
    app, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
    served, _ = hostile_app(where, Runs(tmp_path / "runs"), task_default_queue=queue, **settings)
    with server_lock(where):
        try:
            with running(served, queues=[queue], concurrency=1) as (worker, thread):
                worker.results.hold_max = 3.0
                big = tasks["huge"].apply_async((mib,))

                def over() -> bool:
                    return big.state != "PENDING" or runs.count(big.id) > 1

                eventually(over, 120, message="the result stored, or the task run again")
                after = tasks["count"].apply_async((1,))
                assert after.get(timeout=60) == 1
                assert thread.is_alive()
            executions = runs.count(big.id)
            record = app.backend.fetch(big.id)
            assert executions == 1, f"ran {executions} times"
            assert record is not None
            assert record.state == State.FAILURE
            assert worker.stats["minimal_results"] == 1
            assert settled(app, queue) == (0, 0)
        finally:
            served.close()
            app.close()
            cleanup(where, queue)
    figures(
        "1-oversized-result", backend, bad_inputs=1, result_mib=mib, executions=executions,
        duplicated=executions - 1, lost=0,
    )  # fmt: skip

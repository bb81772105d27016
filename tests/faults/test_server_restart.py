"""The broker's server is restarted (twice) in the middle of a run: producers and workers
recover by themselves within a bounded time and no task is lost.

Each scenario runs its own server on a private loopback port, so no other test sees the
outage (the machine's servers are never touched):

* Redis: a private ``redis-server`` with ``appendonly yes, appendfsync always`` is SIGKILLed
  (a crash, not a clean shutdown), left down for ``OUTAGE`` seconds, and started again from
  its append-only file. Without persistence a restarted Redis is empty and every queued task
  is gone: that is Redis's contract, so the test states the configuration it proves.
* PostgreSQL: a throwaway cluster (initdb + pg_ctl as the postgres user) is stopped with
  ``-m immediate`` (no shutdown checkpoint: crash recovery on start), left down, started.

(RabbitMQ: tests/faults/test_amqp_restart.py restarts the machine's node under an exclusive
lock and records its figures in the same report.)

Two producer threads publish ``TOTAL`` tasks at a steady pace (so publishing spans both
restarts), retrying a publish that raised (a publish either succeeds or raises; a retry may
duplicate, never lose). Two CLI worker processes (threads pool, 4 slots each) run them. The
test checks: every task has a SUCCESS result; after each restart the workers start more tasks
than they could have held from before it (so they claim from the broker again) within
``RESUME_LIMIT`` seconds, with no worker restarted; duplicate executions are counted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.faults import (
    Markers,
    PrivatePostgres,
    PrivateRedis,
    WorkerProcs,
    record_figures,
    worker_env,
)

from conveyor.core.errors import OperationalError
from conveyor.core.types import State
from conveyor.runtime import App
from conveyor.testing.support import eventually, service_unavailable, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TOTAL = 1200
RATE = 100.0  # publishes per second, both producers together: ~12 s of publishing
RESTART_AT = (0.25, 0.6)  # fractions of TOTAL published when the server is restarted
OUTAGE = 2.0  # seconds the server stays down
RESUME_LIMIT = 20.0
DEADLINE = 240.0


@contextlib.contextmanager
def _redis(tmp_path: Path) -> Iterator[tuple[str, str, Callable[[], None], Callable[[], None]]]:
    try:
        server = PrivateRedis(tmp_path / "redis")
    except FileNotFoundError as exc:
        service_unavailable("redis-server", "redis://", f"not installed: {exc}")
    server.start()
    try:
        yield server.url, server.url, server.kill, server.start
    finally:
        server.stop()


@contextlib.contextmanager
def _postgres(tmp_path: Path) -> Iterator[tuple[str, str, Callable[[], None], Callable[[], None]]]:
    try:
        server = PrivatePostgres()
    except (FileNotFoundError, KeyError) as exc:
        service_unavailable("PostgreSQL (initdb/pg_ctl)", "postgresql://", exc)
    try:
        server.init()
        server.start()
        yield (
            f"sqla+{server.url}",
            f"db+{server.url}",
            lambda: server.stop("immediate"),
            server.start,
        )
    finally:
        server.destroy()


SERVERS: dict[str, Callable[[Path], Any]] = {"redis": _redis, "postgres": _postgres}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_a_server_restart_mid_run_loses_nothing_and_everyone_recovers(
    name: str, tmp_path: Path
) -> None:
    queue = unique_name(f"restart-{name}")
    markers = Markers(tmp_path / "markers")
    with SERVERS[name](tmp_path) as (broker, backend, kill, start):
        producer = App("restart-producer", broker=broker, backend=backend)
        env = worker_env(broker, backend, markers.folder)
        workers = WorkerProcs(env, tmp_path)
        ids: list[str | None] = [None] * TOTAL
        published_at: list[float] = [0.0] * TOTAL
        retries: Counter[str] = Counter()
        errors: list[BaseException] = []
        began = time.monotonic()
        deadline = began + DEADLINE

        def produce(index: int) -> None:
            try:
                for n in range(index, TOTAL, 2):
                    pause = began + n / RATE - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)  # pacing: publishing spans both restarts
                    while True:
                        try:
                            result = producer.send_task("faults.work", (n,), queue=queue)
                            ids[n], published_at[n] = result.id, time.monotonic()
                            break
                        except OperationalError as exc:
                            retries[type(exc).__name__] += 1
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.1)
            except BaseException as exc:
                errors.append(exc)

        producers = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
        resumes: list[float] = []
        outages: list[float] = []
        try:
            producer.broker.declare_queue(queue)
            for _ in range(2):
                workers.start(pool="threads", concurrency=4, extra=("-Q", queue))
            for thread in producers:
                thread.start()
            # Both workers consume (each process writes its own marker file) before the
            # first restart: a worker that cannot reach its broker at startup exits.
            eventually(
                lambda: len(list(markers.folder.glob("*.log"))) >= 2, 60,
                message="both workers running tasks",
            )  # fmt: skip
            for fraction in RESTART_AT:
                eventually(
                    lambda f=fraction: sum(i is not None for i in ids) >= f * TOTAL,
                    DEADLINE,
                    interval=0.05,
                    message=f"{fraction:.0%} published",
                )
                cut = time.monotonic()
                kill()
                time.sleep(OUTAGE)  # the outage itself
                start()
                back = time.monotonic()
                outages.append(back - cut)

                # Resumed = more tasks started after the restart than the workers could
                # have held from before it (2 x prefetch 16): fresh claims from the broker.
                at_back = sum(markers.counts().values())
                eventually(
                    lambda at_back=at_back: sum(markers.counts().values()) > at_back + 32,
                    RESUME_LIMIT, interval=0.05,
                    message="workers claim and run tasks again after the restart",
                )  # fmt: skip
                resumes.append(time.monotonic() - back)
            for thread in producers:
                thread.join(max(1.0, deadline - time.monotonic()))
            assert not errors, errors
            assert all(i is not None for i in ids)
            sent = [i for i in ids if i is not None]
            backend_ = producer.backend

            def all_done() -> bool:
                records = backend_.fetch_many(sent)
                return len(records) == TOTAL and all(
                    r.state == State.SUCCESS for r in records.values()
                )

            eventually(
                all_done, DEADLINE, interval=0.2, max_interval=1.0,
                message=f"all {TOTAL} results SUCCESS",
            )  # fmt: skip
            elapsed = time.monotonic() - began
            runs = markers.counts()
            alive = [p.poll() is None for p in workers.procs]
        finally:
            for thread in producers:
                thread.join(5.0)
            workers.stop_all()
            producer.close()
    unique = sum(1 for i in sent if runs[i])
    duplicates = sum(runs[i] for i in sent) - unique
    record_figures(
        f"restart/{name}",
        kind="restart",
        broker=name,
        tasks=TOTAL,
        restarts=len(outages),
        moved=TOTAL,
        lost=TOTAL - unique,
        duplicated=duplicates,
        publish_retries=sum(retries.values()),
        outage_seconds=[round(o, 1) for o in outages],
        resume_seconds=[round(r, 2) for r in resumes],
        seconds=round(elapsed, 1),
    )
    assert all(alive), "a worker died instead of recovering"
    assert unique == TOTAL, f"{TOTAL - unique} tasks lost"
    assert max(resumes) < RESUME_LIMIT

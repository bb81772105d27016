"""What the issue's classes leave between them, attacked through real workers:

* huge values: a 10 MB task id and a 5 MB header value, on every broker: refused at publish
  with a typed error, or run exactly once (the id too long for any result store: logged,
  acked), the worker alive, the next message served;
* odd queue names (unicode, braces that are Redis hash tags, spaces, AMQP wildcards, a
  name ending in ``.dead``) on every broker: consumed, each task run once;
* the Redis server SIGKILLed and restarted (a private one, append-only) in the middle of a
  hostile batch: every good message runs, duplicates stay within what the worker held,
  every bad one is dead-lettered exactly once;
* signals mid-store: a task ran, its result store (behind a TCP proxy) refuses connections,
  and the worker gets SIGTERM (warm: it waits ``worker_shutdown_timeout`` for the store, then
  gives the message back and exits 0) or SIGKILL; the next worker runs it again once and
  stores it: at most one extra execution per injected fault.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hostile_support import (
    BROKERS,
    REDIS_URL,
    CliWorker,
    Place,
    Planter,
    Runs,
    cleanup,
    figures,
    hostile_app,
    place,
    running,
    server_lock,
    settled,
)
from support.faults import PrivateRedis, TcpProxy

from conveyor.core.errors import ConfigurationError, OperationalError, SerializationError
from conveyor.core.types import State
from conveyor.testing.support import eventually, requirement_missing, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MB = 1 << 20


@pytest.mark.parametrize("broker", BROKERS)
def test_a_10_mb_id_and_a_5_mb_header_run_once_or_are_refused_with_a_typed_error(
    broker: str, tmp_path: Path
) -> None:
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name(f"huge-{broker}")
    app, tasks = hostile_app(where, runs, task_default_queue=queue)
    count = tasks["count"]
    sent: dict[str, str] = {}
    refused: dict[str, str] = {}
    with server_lock(where):
        try:
            app.broker.declare_queue(queue)
            good = [count.apply_async((0,))]
            attempts = {
                "10mb-id": lambda: count.apply_async((1,), task_id="i" * (10 * MB)),
                "5mb-header": lambda: count.apply_async((2,), headers={"big": "v" * (5 * MB)}),
                "70k-header-key": lambda: count.apply_async((3,), headers={"k" * 70_000: 1}),
            }
            for kind, send in attempts.items():
                try:
                    sent[kind] = send().id
                except (ConfigurationError, SerializationError) as exc:
                    refused[kind] = type(exc).__name__
                except OperationalError as exc:
                    # MariaDB refusing a value too long for its column or its packet size,
                    # called transient: the xfail in test_hostile_publish.py. Here it must
                    # at least not be published, and the next publish must work.
                    text = str(exc)
                    if broker != "mysql" or not ("Data too long" in text or "gone away" in text):
                        raise
                    refused[kind] = type(exc).__name__
                good.append(count.apply_async((len(good),)))
            with running(app, queues=[queue]) as (worker, thread):
                assert [r.get(timeout=120) for r in good] == list(range(len(good)))
                eventually(
                    lambda: all(runs.count(i) == 1 for i in sent.values()), 60,
                    message="every huge message ran",
                )  # fmt: skip
                eventually(lambda: settled(app, queue) == (0, 0), 60, message="all settled")
                assert count.apply_async((7,)).get(timeout=60) == 7
                assert thread.is_alive()
            assert all(runs.count(i) == 1 for i in sent.values())
            assert settled(app, queue) == (0, 0)
            if "10mb-id" in sent:
                assert worker.stats["unstorable_results"] == 1  # no store takes 10 MB keys
            if "5mb-header" in sent:
                record = app.backend.fetch(sent["5mb-header"])
                assert record is not None
                assert record.state == State.SUCCESS
        finally:
            app.close()
            cleanup(where, queue)
    figures(
        "extra-huge-values", broker, bad_inputs=len(attempts), refused_at_publish=refused,
        executions=len(sent), duplicated=0, lost=0,
    )  # fmt: skip


ODD_QUEUES = [
    "队列-ü-🚀",
    "{hash}-tag",
    "with space",
    "amqp.*.#",
    "ends.dead",
    "q" * 200,
]


@pytest.mark.parametrize("broker", BROKERS)
def test_odd_queue_names_are_consumed_or_refused_when_declared(broker: str, tmp_path: Path) -> None:
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    app, tasks = hostile_app(where, runs)
    suffix = unique_name("")
    usable, refused = [], {}
    with server_lock(where):
        try:
            for name in ODD_QUEUES:
                queue = f"{name}{suffix}"
                try:
                    app.broker.declare_queue(queue)
                except ConfigurationError as exc:
                    refused[name] = str(exc)[:80]
                    continue
                usable.append(queue)
            results = {q: tasks["count"].apply_async((q,), queue=q) for q in usable}
            with running(app, queues=usable) as (_, thread):
                for queue, result in results.items():
                    assert result.get(timeout=60) == queue
                assert thread.is_alive()
            assert all(runs.count(r.id) == 1 for r in results.values())
            assert all(settled(app, q) == (0, 0) for q in usable)
        finally:
            app.close()
            cleanup(where, *usable)
    figures(
        "extra-queue-names", broker, bad_inputs=len(ODD_QUEUES), consumed=len(usable),
        refused=sorted(refused), lost=0, duplicated=0,
    )  # fmt: skip
    assert len(usable) >= len(ODD_QUEUES) - 2, refused  # most names work everywhere


def _private_redis(tmp_path: Path) -> PrivateRedis:
    try:
        server = PrivateRedis(tmp_path / "redis")
    except FileNotFoundError:
        requirement_missing("redis-server is not installed")
    server.start()
    return server


def test_a_redis_restart_mid_batch_loses_nothing_and_dead_letters_each_bad_message_once(
    tmp_path: Path,
) -> None:
    server = _private_redis(tmp_path)
    where = Place("redis", "redis", server.url, server.url)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("restart")
    settings = {"worker_lease_seconds": 2.0, "worker_prefetch_multiplier": 2}
    client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
    workers = CliWorker(where, runs, tmp_path, settings=settings)
    concurrency, total = 2, 60
    try:
        planter = Planter(where, client)
        good = []
        bad = planter.kinds()
        for i in range(total):
            good.append(tasks["sleep"].apply_async((0.05,)))
            if i % 5 == 0 and bad:
                planter.plant(queue, bad[(i // 5) % len(bad)])
        planted = sum(1 for i in range(total) if i % 5 == 0)
        proc = workers.start(queue=queue, pool="threads", concurrency=concurrency)
        eventually(lambda: runs.total() >= 20, 60, message="a third of the batch ran")
        client.close()
        server.restart()  # SIGKILL, then start from the append-only file
        client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
        assert [r.get(timeout=120) for r in (client.AsyncResult(g.id) for g in good)] == [1] * total
        eventually(
            lambda: settled(client, queue) == (0, planted), 60,
            message="every bad message dead-lettered once",
        )  # fmt: skip
        assert proc.poll() is None, workers.log()[-3000:]
        begun = [runs.count(g.id) for g in good]
        done = [runs.count(f"{g.id}/done") for g in good]
    finally:
        workers.stop_all()
        client.close()
        server.stop()
    duplicated = sum(begun) - total
    held = concurrency * settings["worker_prefetch_multiplier"]
    figures(
        "extra-restart-mid-batch", "redis", tasks=total, bad_inputs=planted, restarts=1,
        executions=sum(begun), duplicated=duplicated, duplicate_bound=held, lost=0,
    )  # fmt: skip
    assert all(d >= 1 for d in done)
    assert duplicated <= held, begun


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_signal_while_the_result_store_is_unreachable_costs_at_most_one_extra_run(
    sig: str, tmp_path: Path
) -> None:
    port = int(REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    db = REDIS_URL.rsplit("/", 1)[1]
    queue = unique_name("midstore")
    runs = Runs(tmp_path / "runs")
    with TcpProxy(port) as proxy:
        backend = f"redis://127.0.0.1:{proxy.port}/{db}?socket_timeout=2&socket_connect_timeout=1"
        where = Place("redis", "redis", REDIS_URL, backend)
        place("redis", tmp_path)  # skips when Redis is down
        settings = {"worker_lease_seconds": 2.0, "worker_shutdown_timeout": 2.0}
        client, tasks = hostile_app(where, runs, task_default_queue=queue, **settings)
        workers = CliWorker(where, runs, tmp_path, settings=settings)
        try:
            result = tasks["sleep"].apply_async((1.0,))
            first = workers.start(queue=queue, pool="threads", concurrency=1)
            eventually(lambda: runs.count(result.id) == 1, 60, message="the task started")
            proxy.refuse = True  # the result store goes away while the task runs
            proxy.cut()
            eventually(lambda: "stays held" in workers.log(0), 30, message="store retried")
            assert runs.count(f"{result.id}/done") == 1  # it ran to the end
            if sig == "SIGTERM":
                os.killpg(first.pid, signal.SIGTERM)
                assert first.wait(30) == 0, workers.log(0)[-3000:]
            else:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(10)
            proxy.refuse = False
            second = workers.start(queue=queue, pool="threads", concurrency=1)
            assert client.AsyncResult(result.id).get(timeout=60) == 1
            assert second.poll() is None
            executions = runs.count(result.id)
        finally:
            workers.stop_all()
            client.close()
            cleanup(where, queue)
    figures(
        f"extra-signal-mid-store-{sig}", "redis", tasks=1, kills=1, executions=executions,
        duplicated=executions - 1, lost=0,
    )  # fmt: skip
    assert executions == 2  # the run whose result was lost with the store, and one more

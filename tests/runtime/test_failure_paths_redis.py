"""Exact failure paths of the worker on Redis (broker and results), where they differed:
before issue 13, a return value the result serializer cannot encode ran 5 times on Redis and
ended as a misleading WorkerLostError (Celery runs it once and stores the EncodeError).

Counts asserted: the unencodable value runs once (FAILURE ``EncodeError``); a task id Redis
cannot take as a key (a lone surrogate) runs once and is acked without a result; results
unreachable for several leases after the task ran: it runs once and is stored on recovery.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from failpaths import Runs, Unstorable, running
from support.faults import TcpProxy
from support.redis import REDIS_URL, delete_keys, require_redis

from conveyor import App
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.types import State
from conveyor.testing.support import eventually, unique_name


@pytest.fixture
def queue() -> Iterator[str]:
    client = require_redis()
    name = unique_name("fp-redis")
    yield name
    delete_keys(client, f"*{name}*")
    client.close()


def _app(queue: str, backend: str = REDIS_URL, **settings: Any) -> App:
    settings.setdefault("worker_lease_seconds", 1.0)
    return App("fpr", broker=REDIS_URL, backend=backend, task_default_queue=queue, **settings)


def _settled(app: App, queue: str) -> tuple[int, int]:
    broker = app.broker
    return broker.size(queue), broker.size(broker.dead_letter_queue(queue))


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_an_unencodable_return_value_runs_once_on_redis(
    pool: str, queue: str, tmp_path: Path
) -> None:
    app = _app(queue)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fpr.unencodable", bind=True)
    def unencodable(self: Any) -> Unstorable:
        runs.mark(self.request.id)
        return Unstorable()

    @app.task(name="fpr.ok")
    def ok(n: int) -> int:
        return n

    try:
        good = [ok.delay(i) for i in range(3)]
        bad = unencodable.delay()
        good += [ok.delay(i) for i in range(3, 6)]
        with running(app, pool=pool, concurrency=2) as (worker, thread):
            assert [r.get(timeout=30) for r in good] == list(range(6))
            eventually(lambda: bad.state == "FAILURE", 30, message="the failure is stored")
            assert ok.delay(9).get(timeout=30) == 9
            assert thread.is_alive()
        assert runs.count(bad.id) == 1
        assert _settled(app, queue) == (0, 0)
        record = app.backend.fetch_many([bad.id])[bad.id]
        assert record.state == State.FAILURE
        assert record.result["exc_type"] == "EncodeError"
        assert "not JSON serializable" in record.result["exc_message"][0]
        assert worker.stats["minimal_results"] == 1
    finally:
        app.close()


def test_a_task_id_redis_cannot_store_runs_once_and_is_acked(
    queue: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(queue)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fpr.echo", bind=True)
    def echo(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    odd_id = f"\ud800-{uuid.uuid4()}"  # a Celery client's JSON can carry it
    envelope = build_envelope(TaskMessage(task="fpr.echo", id=odd_id, args=(7,)))
    try:
        before = echo.delay(1)
        app.broker.declare_queue(queue)
        app.broker.publish(dataclasses.replace(envelope, id=str(uuid.uuid4())), queue=queue)
        after = echo.delay(2)
        caplog.set_level(logging.ERROR, logger="conveyor.worker")
        with running(app, pool="threads", concurrency=2) as (worker, thread):
            assert (before.get(timeout=30), after.get(timeout=30)) == (1, 2)
            eventually(lambda: worker.stats["unstorable_results"] == 1, 30)
            assert thread.is_alive()
        assert runs.count(odd_id) == 1
        assert _settled(app, queue) == (0, 0)
        assert any("no result can be stored" in r.getMessage() for r in caplog.records)
    finally:
        app.close()


def test_results_unreachable_for_several_leases_hold_the_message_and_it_runs_once(
    queue: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    db = REDIS_URL.rsplit("/", 1)[1]
    with TcpProxy(port) as proxy:
        app = _app(queue, backend=f"redis://127.0.0.1:{proxy.port}/{db}")
        runs = Runs(tmp_path / "runs")

        @app.task(name="fpr.work", bind=True)
        def work(self: Any, n: int) -> int:
            runs.mark(self.request.id)
            proxy.refuse = True  # the result store goes away while the task runs
            proxy.cut()
            return n

        try:
            app.backend.fetch_many(["warm-up"])
            caplog.set_level(logging.WARNING, logger="conveyor.worker")
            result = work.delay(5)
            with running(app, pool="threads", concurrency=2) as (_, thread):
                eventually(lambda: runs.count(result.id) == 1, 30, message="the task ran")
                eventually(lambda: any("stays held" in r.getMessage() for r in caplog.records), 30)
                held_until = time.monotonic() + 3.0  # three 1 s leases: never redelivered
                while time.monotonic() < held_until:
                    assert app.broker.size(queue) == 0
                    time.sleep(0.1)
                proxy.refuse = False
                assert result.get(timeout=30) == 5
                assert thread.is_alive()
            assert runs.count(result.id) == 1
            assert _settled(app, queue) == (0, 0)
        finally:
            app.close()

"""Exact failure paths of the worker on RabbitMQ classic queues (rpc:// results), where the
broker counts no deliveries: before issue 13 a return value the result serializer cannot
encode ran without end there (~4,100 times in 25 s), and an ETA RabbitMQ cannot hold was
published back again and again.

Counts asserted: the unencodable value runs once (FAILURE ``EncodeError``); an ETA past the
longest delay RabbitMQ can hold never runs and is dead-lettered once with a FAILURE naming
the refusal; a task that kills its prefork child every time runs ``worker_max_deliveries``
times (counted by the worker, the queue does not), then FAILURE ``WorkerLostError``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from failpaths import Runs, Unstorable, running
from support.amqp import QueueJanitor, amqp_url, janitor  # noqa: F401 - fixtures

from conveyor import App
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.testing.support import unique_name


@pytest.fixture
def app(janitor: QueueJanitor) -> Iterator[App]:  # noqa: F811 - fixture
    queue = unique_name("fp-amqp")
    application = App(
        "fpa",
        broker=janitor.url,
        backend="rpc://",
        task_default_queue=queue,
        worker_lease_seconds=2.0,
        worker_max_deliveries=2,
    )
    janitor.queues.update({queue, application.oid})
    yield application
    application.close()


def _settled(app: App) -> tuple[int, int]:
    broker, queue = app.broker, app.conf.task_default_queue
    return broker.size(queue), broker.size(broker.dead_letter_queue(queue))


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_an_unencodable_return_value_runs_once_on_a_classic_queue(
    app: App, pool: str, tmp_path: Path
) -> None:
    runs = Runs(tmp_path / "runs")

    @app.task(name="fpa.unencodable", bind=True)
    def unencodable(self: Any) -> Unstorable:
        runs.mark(self.request.id)
        return Unstorable()

    @app.task(name="fpa.ok")
    def ok(n: int) -> int:
        return n

    good = [ok.delay(i) for i in range(3)]
    bad = unencodable.delay()
    good += [ok.delay(i) for i in range(3, 6)]
    with running(app, pool=pool, concurrency=2) as (worker, thread):
        assert [r.get(timeout=30) for r in good] == list(range(6))
        with pytest.raises(Exception, match="not JSON serializable") as raised:
            bad.get(timeout=30)
        assert type(raised.value).__name__ == "EncodeError"
        assert ok.delay(9).get(timeout=30) == 9
        assert thread.is_alive()
    assert runs.count(bad.id) == 1
    assert _settled(app) == (0, 0)
    assert worker.stats["minimal_results"] == 1


def test_an_eta_rabbitmq_cannot_hold_is_dead_lettered_once_and_never_loops(
    app: App, tmp_path: Path
) -> None:
    runs = Runs(tmp_path / "runs")

    @app.task(name="fpa.later", bind=True)
    def later(self: Any) -> str:
        runs.mark(self.request.id)
        return "ran"

    # A Celery client publishes ETA tasks at once, due now for the broker; this one is 20
    # years away, past the longest delay of RabbitMQ delay levels (2^32 - 1 ms), so the
    # worker cannot hand it back with its delay (our own client refuses it at send).
    eta = datetime.now(timezone.utc) + timedelta(days=365 * 20)
    envelope = build_envelope(TaskMessage(task="fpa.later", id=str(uuid.uuid4()), eta=eta))
    envelope = dataclasses.replace(envelope, reply_to=app.oid)
    app.broker.publish(envelope, queue=app.conf.task_default_queue)
    soon = later.delay()
    with running(app, pool="threads", concurrency=2) as (worker, thread):
        assert soon.get(timeout=30) == "ran"
        with pytest.raises(Exception, match="is longer than"):
            app.AsyncResult(envelope.id).get(timeout=30)
        assert thread.is_alive()
    assert runs.count(envelope.id) == 0
    assert worker.stats["dead_lettered"] == 1
    assert worker.stats["deferred"] == 0
    assert _settled(app) == (0, 1)


def test_a_task_that_kills_its_child_every_time_runs_max_deliveries_times(
    app: App, tmp_path: Path
) -> None:
    import os

    runs = Runs(tmp_path / "runs")

    @app.task(name="fpa.die", bind=True)
    def die(self: Any) -> None:
        runs.mark(self.request.id)
        os._exit(1)

    @app.task(name="fpa.ok")
    def ok(n: int) -> int:
        return n

    poison = die.delay()
    good = [ok.delay(i) for i in range(4)]
    with running(app, pool="prefork", concurrency=2) as (_worker, thread):
        assert [r.get(timeout=60) for r in good] == [0, 1, 2, 3]
        with pytest.raises(Exception, match="without completing") as raised:
            poison.get(timeout=60)
        assert type(raised.value).__name__ == "WorkerLostError"
        assert ok.delay(9).get(timeout=30) == 9
        assert thread.is_alive()
    assert runs.count(poison.id) == 2
    assert _settled(app) == (0, 1)


def test_a_retry_rabbitmq_cannot_hold_fails_the_task_once(app: App, tmp_path: Path) -> None:
    runs = Runs(tmp_path / "runs")

    @app.task(name="fpa.retry_far", bind=True)
    def retry_far(self: Any) -> None:
        runs.mark(self.request.id)
        raise self.retry(countdown=1e9)  # ~32 years: past RabbitMQ's longest delay

    @app.task(name="fpa.ok")
    def ok(n: int) -> int:
        return n

    bad = retry_far.delay()
    good = [ok.delay(i) for i in range(3)]
    with running(app, pool="threads", concurrency=2) as (worker, thread):
        assert [r.get(timeout=30) for r in good] == [0, 1, 2]
        with pytest.raises(Exception, match="is longer than"):
            bad.get(timeout=30)
        assert thread.is_alive()
    assert runs.count(bad.id) == 1
    assert _settled(app) == (0, 0)
    assert worker.stats["retried"] == 0

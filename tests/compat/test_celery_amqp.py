"""Real Celery 5.7 and conveyor share RabbitMQ queues and ``rpc://`` results, both ways.

* ``celery->conveyor``: a Celery client (``celery_amqp_app``, py-amqp) publishes; a conveyor
  worker (threads pool, in this process, :class:`AMQPBroker`) runs the task and sends the
  result with conveyor's ``rpc://`` backend to the Celery client's reply queue; Celery's
  ``AsyncResult.get()`` reads it.
* ``conveyor->celery``: a conveyor client publishes with :class:`AMQPBroker`; a real
  ``celery worker`` subprocess (``-P solo``) runs it and sends the result with Celery's rpc
  backend to conveyor's reply queue; conveyor's ``AsyncResult.get()`` reads it.

Each direction covers positional and keyword arguments, unicode, a failing task (exception
type and arguments preserved), countdown (Celery publishes ETA tasks at once; conveyor's
worker gives them to RabbitMQ's delay levels; conveyor's client delays in RabbitMQ and
Celery's worker gets the message when due), a second custom queue, and priority on queues
both sides declare with ``x-max-priority`` (so neither gets 406 PRECONDITION_FAILED).
Queues are unique per run and deleted after; every wait is bounded; Celery workers are
always terminated.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

from support.amqp import AMQP_URL, QueueJanitor, require_amqp, server_lock, terminating

from conveyor.core.types import State
from conveyor.runtime import App
from conveyor.testing.support import unique_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import celery_amqp_app  # noqa: E402
from celery_amqp_app import AMQPCompatError  # noqa: E402

TIMEOUT = 30.0
RUN = unique_name("amqpcompat")
CELERY_QUEUE = f"{RUN}-celery"
CONVEYOR_QUEUE = f"{RUN}-conveyor"
CUSTOM = "-custom"
PRIORITY = 9


@dataclass
class Direction:
    """One client side sending to the other side's worker."""

    name: str
    client: Any
    queue: str
    worker: str  # "celery" or "conveyor": who runs the task

    def send(self, task: str, *args: Any, queue: str | None = None, **options: Any) -> Any:
        """Send; return the client's AsyncResult. With rpc:// only that object (the one the
        result arrives for) knows the outcome: a new AsyncResult for the same id is PENDING
        on Celery's side once the result was consumed ("results can be read once")."""
        kwargs = options.pop("kwargs", {})
        return self.client.send_task(
            task, args=list(args), kwargs=kwargs, queue=queue or self.queue, **options
        )

    @staticmethod
    def get(result: Any) -> Any:
        return result.get(timeout=TIMEOUT)

    @staticmethod
    def state(result: Any) -> str:
        return str(result.state)


@pytest.fixture(scope="module")
def janitor() -> Iterator[QueueJanitor]:
    with server_lock():
        keeper = QueueJanitor(require_amqp())
        yield keeper
        keeper.queues |= {
            CELERY_QUEUE,
            CELERY_QUEUE + CUSTOM,
            CONVEYOR_QUEUE,
            CONVEYOR_QUEUE + CUSTOM,
        }
        keeper.clean()


def _conveyor_client(janitor: QueueJanitor, max_priority: int | None = None) -> App:
    app = celery_amqp_app.make_conveyor_app(max_priority)
    janitor.track(app.broker)
    # Celery's client declares its reply queue before the first publish (on_task_call);
    # conveyor's App does not yet (see docs/stores/amqp.md), so do it here.
    app.backend.declare_reply_queue()
    return app


@pytest.fixture(scope="module")
def conveyor_client(janitor: QueueJanitor) -> Iterator[App]:
    app = _conveyor_client(janitor)
    yield app
    app.close()


@pytest.fixture(scope="module")
def celery_client(janitor: QueueJanitor) -> Iterator[Any]:
    app = celery_amqp_app.make_celery_app()
    yield app
    app.close()


@contextlib.contextmanager
def conveyor_worker(
    janitor: QueueJanitor, queues: list[str], max_priority: int | None = None
) -> Iterator[App]:
    app = celery_amqp_app.make_conveyor_app(max_priority)
    janitor.track(app.broker)
    worker = app.Worker(queues=queues, pool="solo", prefetch_multiplier=1)
    thread = threading.Thread(target=worker.start, name="conveyor-amqp-compat", daemon=True)
    thread.start()
    try:
        assert worker.wait_started(15.0), "conveyor worker did not start"
        yield app
    finally:
        worker.stop()
        thread.join(15.0)
        app.close()


@contextlib.contextmanager
def celery_worker(
    queues: list[str], log: Path, *, max_priority: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")]))
    env["CONVEYOR_TEST_AMQP_URL"] = AMQP_URL
    if max_priority:
        env["CONVEYOR_TEST_CELERY_MAX_PRIORITY"] = str(max_priority)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_amqp_app",
        "worker",
        "-P",
        "solo",
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{unique_name('w')}@localhost",
        "-Q",
        ",".join(queues),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with terminating(proc):
            yield proc


def _wait_ready(ping: Callable[[], Any], proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        ping()
    except Exception:
        proc.terminate()
        raise AssertionError(f"Celery worker not ready: {log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def celery_side(conveyor_client: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    with celery_worker([CELERY_QUEUE, CELERY_QUEUE + CUSTOM], log) as proc:
        # Ready when it runs a task: conveyor sends, Celery runs, conveyor reads (rpc).
        ping = conveyor_client.send_task("amqpcompat.add", (1, 1), queue=CELERY_QUEUE)
        _wait_ready(lambda: ping.get(timeout=60.0), proc, log)
        yield


@pytest.fixture(scope="module")
def conveyor_side(janitor: QueueJanitor) -> Iterator[None]:
    with conveyor_worker(janitor, [CONVEYOR_QUEUE, CONVEYOR_QUEUE + CUSTOM]):
        yield


@pytest.fixture(params=["celery->conveyor", "conveyor->celery"])
def direction(
    request: pytest.FixtureRequest,
    celery_client: Any,
    conveyor_client: App,
    conveyor_side: None,
    celery_side: None,
) -> Direction:
    if request.param == "celery->conveyor":
        return Direction(request.param, celery_client, CONVEYOR_QUEUE, "conveyor")
    return Direction(request.param, conveyor_client, CELERY_QUEUE, "celery")


def test_positional_arguments(direction: Direction) -> None:
    assert direction.get(direction.send("amqpcompat.add", 2, 40)) == 42


def test_keyword_arguments(direction: Direction) -> None:
    result = direction.send(
        "amqpcompat.echo", 1, "two", kwargs={"x": 3, "y": [4, {"five": 5.5}], "none": None}
    )
    assert direction.get(result) == {
        "args": [1, "two"],
        "kwargs": {"x": 3, "y": [4, {"five": 5.5}], "none": None},
    }


def test_unicode_strings(direction: Direction) -> None:
    text = 'héllo wörld ✓ 日本語 🎉 — "quoted" \\ back'
    got = direction.get(direction.send("amqpcompat.echo", text, kwargs={"ключ": text}))
    assert got == {"args": [text], "kwargs": {"ключ": text}}


@pytest.mark.parametrize(
    ("custom", "exc_type", "args"),
    [(False, ValueError, ("bad value ✗",)), (True, AMQPCompatError, ("bad value ✗", 42))],
)
def test_a_failing_task_is_seen_as_failure_with_its_exception(
    direction: Direction, custom: bool, exc_type: type[Exception], args: tuple[Any, ...]
) -> None:
    result = direction.send("amqpcompat.boom", "bad value ✗", kwargs={"custom": custom})
    with pytest.raises(exc_type) as info:
        direction.get(result)
    assert type(info.value) is exc_type
    assert info.value.args == args
    assert direction.state(result) == State.FAILURE.value


def test_countdown_runs_the_task_no_earlier_than_asked(direction: Direction) -> None:
    sent = time.time()
    ran = direction.get(direction.send("amqpcompat.now", countdown=1.5))
    assert ran >= sent + 1.5 - 0.05  # both clocks are this machine's
    assert ran < sent + 1.5 + 10.0


def test_a_second_custom_queue(direction: Direction) -> None:
    result = direction.send("amqpcompat.add", 20, 22, queue=direction.queue + CUSTOM)
    assert direction.get(result) == 42


PRIORITIES = [0, 5, 9, 1, 3, 7]


def _priority_order(results: list[dict[str, Any]]) -> list[int]:
    return [int(r["tag"]) for r in sorted(results, key=lambda r: r["at"])]


def test_celery_priorities_are_served_first_by_conveyor(janitor: QueueJanitor) -> None:
    # Both declare the queue with x-max-priority 9: equivalent, no 406 on either side. The
    # messages wait in RabbitMQ until the worker starts, so only priority decides order.
    queue = unique_name(f"{RUN}-prio")
    janitor.queues.add(queue)
    client = celery_amqp_app.make_celery_app(max_priority=PRIORITY)
    try:
        results = [
            client.send_task("amqpcompat.stamp", args=[str(p)], queue=queue, priority=p)
            for p in PRIORITIES
        ]
        with conveyor_worker(janitor, [queue], max_priority=PRIORITY):
            got = [r.get(timeout=TIMEOUT) for r in results]
    finally:
        client.close()
    assert _priority_order(got) == sorted(PRIORITIES, reverse=True)


def test_conveyor_priorities_are_served_first_by_celery(
    janitor: QueueJanitor, tmp_path: Path
) -> None:
    queue = unique_name(f"{RUN}-prio")
    janitor.queues.add(queue)
    client = _conveyor_client(janitor, max_priority=PRIORITY)
    try:
        results = [
            client.send_task("amqpcompat.stamp", [str(p)], queue=queue, priority=p)
            for p in PRIORITIES
        ]
        log = tmp_path / "worker.log"
        with celery_worker([queue], log, max_priority=PRIORITY) as proc:
            try:
                got = [r.get(timeout=60.0) for r in results]
            except Exception:
                proc.terminate()
                raise AssertionError(f"Celery worker: {log.read_text()[-3000:]}") from None
    finally:
        client.close()
    assert _priority_order(got) == sorted(PRIORITIES, reverse=True)

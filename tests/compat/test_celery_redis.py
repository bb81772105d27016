"""Real Celery 5.7 and conveyor share Redis queues and results, in both directions.

* ``celery->conveyor``: a Celery client (``celery_redis_app.app.send_task``) publishes with
  kombu's Redis transport; a conveyor worker (``conveyor.runtime`` Worker, solo pool, in a
  thread of this process) runs the task; the Celery client's ``AsyncResult.get()`` reads the
  result conveyor stored (it waits on pub/sub, so conveyor must PUBLISH).
* ``conveyor->celery``: a conveyor client publishes with :class:`RedisBroker`; a real
  ``celery worker`` subprocess (``-P solo``, its own queues) runs it; conveyor's
  ``AsyncResult.get()`` reads the result Celery stored.

Each direction covers positional and keyword arguments, unicode, a task raising (the
client sees FAILURE and the right exception type and message), countdown, priority (the
most urgent message as the *sender* means it is served first by the other side's worker)
and a second, custom queue. Queues are unique per run; every wait is bounded; the Celery
worker is always terminated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

import redis
from support.redis import REDIS_URL, delete_keys, require_redis, terminating

from conveyor.core.types import State
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.redis import RedisBroker

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import celery_redis_app  # noqa: E402
import conveyor_redis_app  # noqa: E402
from celery_redis_app import CompatError  # noqa: E402

TIMEOUT = 30.0
RUN = unique_name("compat")
CELERY_QUEUE = f"{RUN}-celery"
CONVEYOR_QUEUE = f"{RUN}-conveyor"
CUSTOM = "-custom"


@dataclass
class Direction:
    """One client side sending to the other side's worker."""

    name: str
    client: Any
    queue: str
    most_urgent: int  # the sender's priority value meaning "serve first"
    least_urgent: int
    worker: str  # "celery" or "conveyor": who must have run the task

    def send(self, task: str, *args: Any, queue: str | None = None, **options: Any) -> str:
        kwargs = options.pop("kwargs", {})
        result = self.client.send_task(
            task, args=list(args), kwargs=kwargs, queue=queue or self.queue, **options
        )
        return str(result.id)

    def get(self, task_id: str) -> Any:
        return self.client.AsyncResult(task_id).get(timeout=TIMEOUT)

    def state(self, task_id: str) -> str:
        return str(self.client.AsyncResult(task_id).state)


@pytest.fixture(scope="module")
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    delete_keys(client, f"*{RUN}*")
    client.close()


@pytest.fixture(scope="module")
def conveyor_client(server: redis.Redis) -> Iterator[Any]:
    app = conveyor_redis_app.make_app(result_expires=600.0)
    yield app
    app.close()


@pytest.fixture(scope="module")
def conveyor_worker(server: redis.Redis) -> Iterator[None]:
    app = conveyor_redis_app.make_app(result_expires=600.0)
    worker = app.Worker(
        queues=[CONVEYOR_QUEUE, CONVEYOR_QUEUE + CUSTOM], pool="solo", prefetch_multiplier=1
    )
    thread = threading.Thread(target=worker.start, name="conveyor-compat-worker", daemon=True)
    thread.start()
    assert worker.wait_started(15.0), "conveyor worker did not start"
    yield
    worker.stop()
    thread.join(15.0)
    app.close()


@pytest.fixture(scope="module")
def celery_worker(
    server: redis.Redis, conveyor_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")]))
    env["CONVEYOR_TEST_REDIS_URL"] = REDIS_URL
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_redis_app",
        "worker",
        "-P",
        "solo",
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{RUN}@localhost",
        "-Q",
        f"{CELERY_QUEUE},{CELERY_QUEUE + CUSTOM}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with terminating(proc, grace=10.0):
            # Ready when it runs a task: conveyor sends, Celery runs, conveyor reads.
            ping = conveyor_client.send_task("compat.add", (1, 1), queue=CELERY_QUEUE)
            try:
                assert ping.get(timeout=60.0) == 2
            except Exception:
                proc.terminate()
                raise AssertionError(
                    f"Celery worker not ready: {log.read_text()[-3000:]}"
                ) from None
            yield
    if proc.returncode not in (0, -15):
        print(log.read_text()[-3000:])


@pytest.fixture(params=["celery->conveyor", "conveyor->celery"])
def direction(
    request: pytest.FixtureRequest,
    conveyor_client: Any,
    conveyor_worker: None,
    celery_worker: None,
) -> Direction:
    if request.param == "celery->conveyor":
        return Direction(request.param, celery_redis_app.app, CONVEYOR_QUEUE, 0, 9, "conveyor")
    return Direction(request.param, conveyor_client, CELERY_QUEUE, 9, 0, "celery")


def test_positional_arguments(direction: Direction) -> None:
    assert direction.get(direction.send("compat.add", 2, 40)) == 42


def test_keyword_arguments(direction: Direction) -> None:
    task_id = direction.send("compat.echo", 1, "two", kwargs={"x": 3, "y": [4, {"five": 5.5}]})
    assert direction.get(task_id) == {
        "args": [1, "two"],
        "kwargs": {"x": 3, "y": [4, {"five": 5.5}]},
        "worker": direction.worker,
    }


def test_unicode_strings(direction: Direction) -> None:
    text = 'héllo wörld ✓ 日本語 🎉 — "quoted" \\ back'
    task_id = direction.send("compat.echo", text, kwargs={"ключ": text})
    got = direction.get(task_id)
    assert got["args"] == [text]
    assert got["kwargs"] == {"ключ": text}
    assert got["worker"] == direction.worker


@pytest.mark.parametrize(("custom", "exc_type"), [(False, ValueError), (True, CompatError)])
def test_a_failing_task_is_seen_as_failure_with_its_exception(
    direction: Direction, custom: bool, exc_type: type[Exception]
) -> None:
    task_id = direction.send("compat.boom", "bad value ✗", kwargs={"custom": custom})
    with pytest.raises(exc_type) as info:
        direction.get(task_id)
    assert type(info.value) is exc_type
    assert info.value.args == ("bad value ✗",)
    assert direction.state(task_id) == State.FAILURE.value


def test_countdown_delays_execution(direction: Direction) -> None:
    countdown = 1.5
    sent_at = time.time()
    task_id = direction.send("compat.now", countdown=countdown)
    ran_at = direction.get(task_id)
    assert ran_at - sent_at >= countdown - 0.05, (sent_at, ran_at)


def test_the_senders_most_urgent_priority_is_served_first(
    direction: Direction, server: redis.Redis
) -> None:
    # A blocker occupies the worker (prefetch 1, acked late), then the two messages are
    # queued: the urgent one, sent second, must run first.
    key = unique_name(f"{RUN}-order")
    probe = RedisBroker.from_url(REDIS_URL)
    try:
        blocker = direction.send("compat.record", key, "blocker", 1.0)
        eventually(lambda: probe.size(direction.queue) == 0, TIMEOUT, message="blocker taken")
        low = direction.send("compat.record", key, "low", priority=direction.least_urgent)
        high = direction.send("compat.record", key, "high", priority=direction.most_urgent)
        for task_id in (blocker, low, high):
            direction.get(task_id)
    finally:
        probe.close()
    assert [t.decode() for t in server.lrange(key, 0, -1)] == ["blocker", "high", "low"]


def test_a_custom_queue(direction: Direction) -> None:
    task_id = direction.send("compat.echo", "routed", queue=direction.queue + CUSTOM)
    assert direction.get(task_id)["worker"] == direction.worker


def test_conveyor_messages_look_like_celerys_in_redis(server: redis.Redis) -> None:
    """The envelope conveyor LPUSHes has the same fields and types as Celery's own."""
    queue = unique_name(f"{RUN}-shape")
    with celery_redis_app.app.connection_for_write() as conn:
        celery_redis_app.app.send_task("compat.add", (1, 2), queue=queue, connection=conn)
    conveyor_app = conveyor_redis_app.make_app()
    try:
        conveyor_app.send_task("compat.add", (1, 2), queue=queue)
    finally:
        conveyor_app.close()
    from kombu.utils.json import loads

    # Celery's unprioritised message (kombu priority 0, its most urgent) is in the bare
    # list; conveyor's default priority 0 (its least urgent) is kombu priority 9.
    [theirs] = [loads(m) for m in server.lrange(queue, 0, -1)]
    [ours] = [loads(m) for m in server.lrange(f"{queue}\x06\x169", 0, -1)]
    assert list(ours) == list(theirs)
    assert list(ours["properties"]) == list(theirs["properties"])
    assert set(ours["headers"]) == set(theirs["headers"])
    for field in ("delivery_mode", "body_encoding", "delivery_info"):
        assert ours["properties"][field] == theirs["properties"][field]
    assert (theirs["properties"]["priority"], ours["properties"]["priority"]) == (0, 9)
    assert server.sismember(f"_kombu.binding.{queue}", f"{queue}\x06\x16\x06\x16{queue}")
    server.delete(queue, f"{queue}\x06\x169", f"_kombu.binding.{queue}")

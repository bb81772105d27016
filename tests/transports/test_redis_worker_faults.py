"""What kombu's Redis transport gets wrong, shown with conveyor's worker on RedisBroker.

* A task running far longer than the lease, on a live worker, runs exactly once: the
  worker's heartbeat extends its lease. (kombu: anything unacked longer than
  ``visibility_timeout`` is restored by any consumer's sweep and runs again, celery#5935.)
* A worker process SIGKILLed while it holds several messages (prefetch > 1) loses none:
  after its leases expire another worker completes every message exactly once.
* 10,000 countdown tasks wait in Redis (the delayed sorted set), not in a running worker:
  its resident memory stays flat. (kombu: every ETA message is held in worker memory.)

Workers that must be killed or measured run as subprocesses of this very file
(``python test_redis_worker_faults.py worker <queue> <lease> <prefetch>``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # a worker subprocess: make the test helpers importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest
import redis
from support.redis import REDIS_URL, delete_keys, require_redis, terminating, vm_rss_kib

from conveyor.runtime import App
from conveyor.testing.support import eventually, unique_name

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent.parent


def make_app(queue: str, *, lease: float, url: str = REDIS_URL, **settings: Any) -> App:
    """The app both the tests and the worker subprocesses use."""
    app = App(
        "faults",
        broker=url,
        backend=url,
        task_default_queue=queue,
        worker_lease_seconds=lease,
        result_expires=600.0,
        **settings,
    )
    client = redis.Redis.from_url(url)

    @app.task(name="faults.work", bind=True)
    def work(self: Any, key: str, n: int, seconds: float) -> int:
        client.hincrby(f"{key}:started", str(n), 1)
        time.sleep(seconds)
        client.hincrby(f"{key}:completed", str(n), 1)
        client.hset(f"{key}:by", str(n), f"{os.getpid()}:{int(self.request.redelivered)}")
        return n

    @app.task(name="faults.noop")
    def noop() -> None:
        return None

    return app


def _run_worker(queue: str, lease: float, prefetch: int) -> None:
    app = make_app(queue, lease=lease)
    worker = app.Worker(queues=[queue], pool="threads", concurrency=1, prefetch_multiplier=prefetch)
    worker.start()


def _spawn(queue: str, lease: float, prefetch: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CONVEYOR_TEST_REDIS_URL=REDIS_URL)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(HERE), "worker", queue, str(lease), str(prefetch)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def queue(server: redis.Redis) -> Iterator[str]:
    name = unique_name("faults")
    yield name
    delete_keys(server, f"*{name}*")


def _thread_worker(app: App, queue: str, **options: Any) -> tuple[Any, threading.Thread]:
    worker = app.Worker(queues=[queue], **options)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert worker.wait_started(15.0)
    return worker, thread


def test_a_task_longer_than_its_lease_runs_once_while_its_worker_lives(
    server: redis.Redis, queue: str
) -> None:
    lease, runtime = 1.0, 4.0  # the task runs four leases long
    key = unique_name(f"{queue}-long")
    app = make_app(queue, lease=lease)
    workers = [
        _thread_worker(app, queue, pool="threads", concurrency=2, prefetch_multiplier=1)
        for _ in range(2)
    ]  # a second, idle worker would pick up a redelivered copy at once
    try:
        result = app.send_task("faults.work", (key, 1, runtime))
        assert result.get(timeout=runtime + 20) == 1
    finally:
        for worker, thread in workers:
            worker.stop()
            thread.join(15)
        app.close()
    assert server.hgetall(f"{key}:started") == {b"1": b"1"}, "the task started twice"
    assert server.hgetall(f"{key}:completed") == {b"1": b"1"}


def test_sigkilled_worker_holding_messages_loses_none_and_runs_each_once(
    server: redis.Redis, queue: str, tmp_path: Path
) -> None:
    lease, count, seconds = 2.0, 12, 0.4
    key = unique_name(f"{queue}-kill")
    app = make_app(queue, lease=lease)
    results = [app.send_task("faults.work", (key, n, seconds)) for n in range(count)]
    leases_key = f"conveyor:{{{queue}}}:leases"
    doomed = _spawn(queue, lease, 4, tmp_path / "doomed.log")
    with terminating(doomed):
        # Holding several messages (prefetch 4) and in the middle of one.
        eventually(
            lambda: server.hlen(leases_key) >= 3 and server.hlen(f"{key}:started") >= 1,
            30,
            message="doomed worker holding messages",
        )
        held = server.hlen(leases_key)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
    done_before = set(server.hkeys(f"{key}:completed"))
    survivor, thread = _thread_worker(
        app, queue, pool="threads", concurrency=2, prefetch_multiplier=2
    )
    try:
        for result in results:
            result.get(timeout=60)
    finally:
        survivor.stop()
        thread.join(15)
        app.close()
    completed = {int(k): int(v) for k, v in server.hgetall(f"{key}:completed").items()}
    assert completed == dict.fromkeys(range(count), 1), completed
    by = {int(k): v.decode() for k, v in server.hgetall(f"{key}:by").items()}
    redelivered = [n for n, who in by.items() if who == f"{os.getpid()}:1"]
    print(
        f"\nSIGKILL: the killed worker held {held} messages and had completed "
        f"{len(done_before)}; the survivor completed {count - len(done_before)}, "
        f"{len(redelivered)} of them redelivered after lease expiry; every one of "
        f"{count} completed exactly once"
    )
    assert len(redelivered) >= held - 1
    assert server.hlen(leases_key) == 0


def test_ten_thousand_delayed_tasks_leave_a_running_workers_memory_flat(
    server: redis.Redis, queue: str, tmp_path: Path
) -> None:
    worker = _spawn(queue, 30.0, 4, tmp_path / "rss.log")
    app = make_app(queue, lease=30.0)
    with terminating(worker):
        # Warm up: the worker has imported everything and run a few tasks.
        for _ in range(3):
            app.send_task("faults.noop").get(timeout=30)
        time.sleep(1.0)
        before = vm_rss_kib(worker.pid)
        broker = app.broker
        from conveyor.core.celery import TaskMessage, build_envelope

        envelopes = [
            build_envelope(TaskMessage(task="faults.noop", id=unique_name("eta")))
            for _ in range(10_000)
        ]
        for start in range(0, len(envelopes), 1000):
            broker.publish_many(envelopes[start : start + 1000], queue=queue, delay=3600.0)
        delayed_key = f"conveyor:{{{queue}}}:delayed"
        assert server.zcard(delayed_key) == 10_000
        # The worker keeps claiming (and so scanning for due messages) meanwhile.
        app.send_task("faults.noop").get(timeout=30)
        time.sleep(3.0)
        app.send_task("faults.noop").get(timeout=30)
        after = vm_rss_kib(worker.pid)
        assert server.zcard(delayed_key) == 10_000, "a delayed task left Redis"
        # The result is stored before the delivery is acked: the last lease goes a moment
        # after get() returns.
        leases = f"conveyor:{{{queue}}}:leases"
        eventually(lambda: server.hlen(leases) == 0, 10, message="every lease released")
    app.close()
    growth = (after - before) / before
    print(
        f"\nRSS of the running worker: {before} KiB before, {after} KiB after 10,000 "
        f"countdown=3600 tasks were queued ({growth:+.1%}); all 10,000 stayed in Redis"
    )
    assert growth < 0.10, (before, after)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        _run_worker(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))

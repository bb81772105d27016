"""Exact failure paths of the worker (issue 13), on the memory:// stores and on the embedded
SQLite ones, in every pool: executions are counted outside the system under test, and each
test checks the worker is alive and still serving after the bad message, that the other
messages of the same batch completed, and what was stored.

Counts asserted (per pool and store):

* a return value the store cannot hold: the task runs once, a minimal FAILURE names the
  store's error, the message is acked (never given back);
* a task id the result store refuses (a lone surrogate, as a Celery client can send): the
  task runs once, no record, the message is acked;
* the result store unreachable after the task ran: the task runs once, the message stays
  held (its lease renewed) until the store succeeds;
* SystemExit / KeyboardInterrupt from a task: FAILURE, once, and the one slot goes on;
* a prefork child dying mid-task: replaced, the message runs once more (2 runs), and a
  message that always kills its child runs ``worker_max_deliveries`` times, then FAILURE;
* refused messages (unsigned, forged, undecodable, too large, a disallowed content type)
  write no result under the id they claim; an unknown task from a valid message does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from failpaths import Runs, Unstorable, make_app, running

from conveyor import App, Envelope
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.signing import Signer
from conveyor.core.types import State
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually

POOLS = ["solo", "threads", "prefork"]
STORES = ["memory", "sqlite"]
#: What each store raises for an :class:`Unstorable` return value.
STORE_ERROR = {"memory": "EncodeError", "sqlite": "EncodeError"}


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _settled(app: App, queue: str = "celery") -> tuple[int, int]:
    """(messages still in ``queue``, dead letters): read after the worker stopped, when a
    message given back instead of settled would be in the queue again."""
    broker = app.broker
    return broker.size(queue), broker.size(broker.dead_letter_queue(queue))


# ---------------------------------------------------------------- class 1: not transient


@pytest.mark.parametrize("pool", POOLS)
def test_a_return_value_the_store_cannot_hold_runs_once_and_is_recorded_as_a_failure(
    store: str, pool: str, tmp_path: Path
) -> None:
    app = make_app(store, tmp_path)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.unstorable", bind=True)
    def unstorable(self: Any) -> Unstorable:
        runs.mark(self.request.id)
        return Unstorable()

    @app.task(name="fp.ok", bind=True)
    def ok(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    try:
        before = [ok.delay(i) for i in range(3)]
        bad = unstorable.delay()
        after = [ok.delay(i) for i in range(3, 6)]
        with running(app, pool=pool, concurrency=2) as (worker, thread):
            assert [r.get(timeout=30) for r in before + after] == list(range(6))
            eventually(lambda: bad.state == "FAILURE", 30, message="the failure is recorded")
            assert ok.delay(99).get(timeout=30) == 99  # still serving
            assert thread.is_alive()
        assert runs.count(bad.id) == 1
        assert _settled(app) == (0, 0)  # acked once: neither given back nor dead-lettered
        record = app.backend.fetch_many([bad.id])[bad.id]
        assert record.state == State.FAILURE
        assert record.result["exc_type"] == STORE_ERROR[store]
        assert record.traceback is None  # the minimal record
        assert worker.stats["minimal_results"] == 1
        assert all(runs.count(r.id) == 1 for r in before + after)
    finally:
        app.close()


def test_a_return_value_a_prefork_child_cannot_send_back_fails_once(tmp_path: Path) -> None:
    app = make_app("memory", tmp_path)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.lambda", bind=True)
    def unpicklable(self: Any) -> Any:
        runs.mark(self.request.id)
        return lambda: None

    @app.task(name="fp.ok")
    def ok() -> str:
        return "ok"

    try:
        bad = unpicklable.delay()
        with running(app, pool="prefork", concurrency=1) as (_, thread):
            eventually(lambda: bad.state == "FAILURE", 30)
            assert ok.delay().get(timeout=30) == "ok"
            assert thread.is_alive()
        assert runs.count(bad.id) == 1
        record = app.backend.fetch_many([bad.id])[bad.id]
        assert record.state == State.FAILURE
        assert "pickle" in (record.traceback or "")
    finally:
        app.close()


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_task_id_the_result_store_refuses_runs_once_and_is_acked(
    backend: str, pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate in the id (a Celery client's JSON can carry one): no store can hold
    it (every backend refuses it, the memory one too): no record, said in the log."""
    results = "memory://" if backend == "memory" else f"db+sqlite:///{tmp_path / 'results.db'}"
    app = App("fp", broker="memory://", backend=results, worker_lease_seconds=1.0)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.echo", bind=True)
    def echo(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    odd_id = f"\ud800-{uuid.uuid4()}"
    envelope = build_envelope(TaskMessage(task="fp.echo", id=odd_id, args=(7,)))
    try:
        first = echo.delay(1)
        app.broker.publish(dataclasses.replace(envelope, id=str(uuid.uuid4())), queue="celery")
        last = echo.delay(2)
        caplog.set_level(logging.ERROR, logger="conveyor.worker")
        with running(app, pool=pool, concurrency=2) as (worker, thread):
            assert (first.get(timeout=30), last.get(timeout=30)) == (1, 2)
            eventually(lambda: runs.count(odd_id) == 1, 30, message="the odd task ran")
            eventually(lambda: sum(worker.stats.values()) >= 3, 30, message="all settled")
            assert echo.delay(3).get(timeout=30) == 3
            assert thread.is_alive()
        assert runs.count(odd_id) == 1
        assert _settled(app) == (0, 0)
        assert worker.stats["unstorable_results"] == 1
        assert any("no result can be stored" in r.getMessage() for r in caplog.records)
    finally:
        app.close()


@pytest.mark.parametrize("pool", POOLS)
def test_an_unreachable_result_store_holds_the_message_and_the_task_runs_once(
    pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The results database is locked by another process's transaction (``database is
    locked`` past ``operation_timeout``: an OperationTimeout) for three 1-second leases after
    the task ran: the store is retried, the lease renewed, and the task never runs again."""
    results_db = tmp_path / "results.db"
    app = App(
        "fp",
        broker=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        backend=f"db+sqlite:///{results_db}?operation_timeout=0.2",
        worker_lease_seconds=1.0,
    )
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.work", bind=True)
    def work(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    try:
        app.backend.fetch_many(["warm-up"])  # creates the schema before the lock is taken
        locker = sqlite3.connect(results_db, isolation_level=None, timeout=5)
        caplog.set_level(logging.WARNING, logger="conveyor.worker")
        result, other = work.delay(5), work.delay(6)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with running(app, pool=pool, concurrency=2) as (worker, thread):
                try:
                    eventually(lambda: runs.count(result.id) == 1, 30, message="the task ran")
                    eventually(
                        lambda: any("stays held" in r.getMessage() for r in caplog.records),
                        30,
                        message="the store is retried",
                    )
                    # Absence takes a window: three 1 s leases, and the message is never
                    # given back nor delivered again.
                    held_until = time.monotonic() + 3.0
                    while time.monotonic() < held_until:
                        assert app.broker.size("celery") == 0
                        time.sleep(0.1)
                    assert runs.count(result.id) == 1
                finally:
                    locker.execute("ROLLBACK")
                assert result.get(timeout=30) == 5
                assert other.get(timeout=30) == 6
                assert thread.is_alive()
        finally:
            locker.close()
        assert runs.count(result.id) == 1
        assert runs.count(other.id) == 1
        assert _settled(app) == (0, 0)
        assert worker.stats["succeeded"] == 2
    finally:
        app.close()


def test_a_store_failing_past_the_hold_limit_gives_the_message_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held for ``hold_max`` seconds (300 by default, 1 here), then given back: a backend
    that calls a permanent refusal transient cannot hold a slot for ever. The task runs at
    most once more per give-up (``worker_max_deliveries`` bounds the give-ups)."""
    results_db = tmp_path / "results.db"
    app = App(
        "fp",
        broker=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        backend=f"db+sqlite:///{results_db}?operation_timeout=0.2",
        worker_lease_seconds=1.0,
    )
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.work", bind=True)
    def work(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    try:
        app.backend.fetch_many(["warm-up"])
        locker = sqlite3.connect(results_db, isolation_level=None, timeout=5)
        caplog.set_level(logging.WARNING, logger="conveyor.worker")
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with running(app, pool="threads", concurrency=1) as (worker, thread):
                worker.results.hold_max = 1.0
                result = work.delay(5)
                try:
                    eventually(
                        lambda: any("still fails after" in r.getMessage() for r in caplog.records),
                        30,
                        message="the worker gives up holding",
                    )
                finally:
                    worker.results.hold_max = 300.0  # the next run waits for the store
                    locker.execute("ROLLBACK")
                assert result.get(timeout=30) == 5
                assert thread.is_alive()
        finally:
            locker.close()
        assert runs.count(result.id) == 2  # given back once: it ran once more
        assert _settled(app) == (0, 0)
    finally:
        app.close()


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
@pytest.mark.parametrize("pool", POOLS)
def test_a_stop_while_the_result_store_is_unreachable_gives_the_message_back(
    pool: str, cold: bool, tmp_path: Path
) -> None:
    """Warm: the result waits ``worker_shutdown_timeout`` (2 s) for its store, then the
    message goes back to the broker (solo included, whose one thread is the one waiting);
    cold: at once. Either way the worker stops, and the task ran once here."""
    results_db = tmp_path / "results.db"
    app = App(
        "fp",
        broker=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        backend=f"db+sqlite:///{results_db}?operation_timeout=0.2",
        worker_lease_seconds=1.0,
        worker_shutdown_timeout=2.0,
    )
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.work", bind=True)
    def work(self: Any, n: int) -> int:
        runs.mark(self.request.id)
        return n

    try:
        app.backend.fetch_many(["warm-up"])
        locker = sqlite3.connect(results_db, isolation_level=None, timeout=5)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            worker = app.Worker(pool=pool, concurrency=1, receive_timeout=0.1)
            thread = threading.Thread(target=worker.start, daemon=True)
            thread.start()
            assert worker.wait_started(30)
            result = work.delay(1)
            eventually(lambda: runs.count(result.id) == 1, 30, message="the task ran")
            started = time.monotonic()
            worker.stop(cold=cold)
            thread.join(30)
            for slot in worker._slots:  # a cold stop leaves them; they stop retrying too
                slot.join(30)
            assert not any(t.is_alive() for t in [thread, *worker._slots])
            assert time.monotonic() - started < 2.0 + 8.0  # shutdown timeout + one backoff
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert runs.count(result.id) == 1
        assert app.broker.size("celery") == 1  # given back, not lost
        assert app.backend.fetch_many([result.id]) == {}
    finally:
        app.close()


# ---------------------------------------------------------------- class 2: no zombies


@pytest.mark.parametrize("pool", POOLS)
def test_systemexit_and_keyboardinterrupt_fail_the_task_and_the_slot_keeps_serving(
    store: str, pool: str, tmp_path: Path
) -> None:
    app = make_app(store, tmp_path)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.exit", bind=True)
    def leave(self: Any, how: str) -> None:
        runs.mark(self.request.id)
        raise SystemExit(3) if how == "exit" else KeyboardInterrupt()

    @app.task(name="fp.ok")
    def ok(n: int) -> int:
        return n

    try:
        bad = [leave.delay("exit"), leave.delay("interrupt"), leave.delay("exit")]
        good = [ok.delay(i) for i in range(3)]
        with running(app, pool=pool, concurrency=1) as (worker, thread):
            assert [r.get(timeout=30) for r in good] == [0, 1, 2]
            eventually(lambda: all(r.state == "FAILURE" for r in bad), 30)
            assert ok.delay(9).get(timeout=30) == 9  # the one slot still serves
            assert thread.is_alive()
            assert all(slot.is_alive() for slot in worker._slots)
        types = [app.backend.fetch_many([r.id])[r.id].result["exc_type"] for r in bad]
        assert types == ["SystemExit", "KeyboardInterrupt", "SystemExit"]
        assert [runs.count(r.id) for r in bad] == [1, 1, 1]
        assert _settled(app) == (0, 0)
    finally:
        app.close()


def test_the_heartbeat_renews_only_leases_a_live_thread_will_settle(tmp_path: Path) -> None:
    app = make_app("memory", tmp_path)
    try:
        for i in range(3):
            app.send_task("fp.none", (i,))
        deliveries = app.broker.receive("celery", max_messages=3, timeout=1.0)
        assert len(deliveries) == 3
        worker = Worker(app, pool="threads", concurrency=1)
        gone = threading.Thread(target=lambda: None)
        gone.start()
        gone.join()
        running_d, waiting_d, orphan_d = deliveries
        worker._held = {id(d): d for d in deliveries}
        worker._running = {id(running_d): threading.current_thread(), id(orphan_d): gone}
        worker._ready.append(waiting_d)
        # no slot thread alive: the waiting one is not renewed either
        assert {id(d) for d in worker._live_held()} == {id(running_d)}
        slot = threading.Thread(target=time.sleep, args=(2,), daemon=True)
        slot.start()
        worker._slots = [slot]
        assert {id(d) for d in worker._live_held()} == {id(running_d), id(waiting_d)}
        for d in deliveries:
            app.broker.reject(d, requeue=True)
    finally:
        app.close()


@pytest.mark.parametrize("store_name", STORES)
def test_a_prefork_child_dying_mid_task_is_replaced_and_the_task_runs_once_more(
    store_name: str, tmp_path: Path
) -> None:
    app = make_app(store_name, tmp_path, worker_max_deliveries=2)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.die_once", bind=True)
    def die_once(self: Any) -> int:
        runs.mark(self.request.id)
        if runs.count(self.request.id) == 1:
            os._exit(1)  # the child dies mid-task, as under the OOM killer
        return os.getpid()

    @app.task(name="fp.die_always", bind=True)
    def die_always(self: Any) -> None:
        runs.mark(self.request.id)
        os._exit(1)

    @app.task(name="fp.ok")
    def ok(n: int) -> int:
        return n

    try:
        once = die_once.delay()
        always = die_always.delay()
        good = [ok.delay(i) for i in range(4)]
        with running(app, pool="prefork", concurrency=2) as (worker, thread):
            assert [r.get(timeout=60) for r in good] == [0, 1, 2, 3]
            assert once.get(timeout=60) != os.getpid()
            eventually(lambda: always.state == "FAILURE", 60, message="poison dead-lettered")
            assert ok.delay(9).get(timeout=30) == 9
            assert thread.is_alive()
            assert all(child.proc.is_alive() for child in worker._children)
        assert runs.count(once.id) == 2  # the crash and the run that completed
        assert runs.count(always.id) == 2  # worker_max_deliveries, then dead-lettered
        record = app.backend.fetch_many([always.id])[always.id]
        assert record.result["exc_type"] == "WorkerLostError"
        assert _settled(app) == (0, 1)
    finally:
        app.close()


# ---------------------------------------------------------------- class 3: refused


KEY = "a-test-signing-key-0123456789abcdef"


def test_refused_messages_write_no_result_under_the_id_they_claim(
    store: str, tmp_path: Path
) -> None:
    app = make_app(store, tmp_path, security_key=KEY)
    runs = Runs(tmp_path / "runs")

    @app.task(name="fp.add", bind=True)
    def add(self: Any, x: int, y: int) -> int:
        runs.mark(self.request.id)
        return x + y

    victim = str(uuid.uuid4())  # a task id the attacker knows, before its task ran
    fresh = str(uuid.uuid4())
    plain = build_envelope(TaskMessage(task="fp.add", id=victim, args=(1, 1)))
    unsigned = dataclasses.replace(plain, id=str(uuid.uuid4()))
    forged = Signer("an-attackers-key-0123456789abcdef").sign(
        build_envelope(TaskMessage(task="fp.add", id=fresh, args=(2, 2)))
    )
    unknown = Signer(KEY).sign(build_envelope(TaskMessage(task="fp.nobody", id=str(uuid.uuid4()))))
    try:
        first = add.delay(1, 2)
        for envelope in (unsigned, forged, unknown):
            app.broker.publish(envelope, queue="celery")
        last = add.delay(3, 4)
        with running(app, pool="threads", concurrency=2) as (worker, thread):
            assert (first.get(timeout=30), last.get(timeout=30)) == (3, 7)
            eventually(lambda: worker.stats["dead_lettered"] == 3, 30, message="refused")
            assert thread.is_alive()
        backend = app.backend
        assert backend.fetch_many([victim, fresh]) == {}  # nothing written for the refused
        assert backend.fetch_many([unknown.id])[unknown.id].state == State.FAILURE
        assert runs.count(victim) == runs.count(fresh) == 0
        assert _settled(app) == (0, 3)
        # the victim's own task, sent later, is unaffected
        real = add.apply_async((5, 5), task_id=victim)
        with running(app, pool="threads", concurrency=1):
            assert real.get(timeout=30) == 10
    finally:
        app.close()


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_undecodable_oversized_and_disallowed_messages_write_no_result(
    store: str, tmp_path: Path
) -> None:
    app = make_app(store, tmp_path, worker_max_message_size=4096)

    @app.task(name="fp.echo")
    def echo(n: int) -> int:
        return n

    def raw(task_id: str, body: bytes, content_type: str = "application/json") -> Envelope:
        headers = {"lang": "py", "task": "fp.echo", "id": task_id}
        return Envelope(id=task_id, body=body, content_type=content_type, headers=headers)

    bad = [
        raw(f"garbage-{uuid.uuid4()}", b"\x00\xff not json"),
        raw(f"too-big-{uuid.uuid4()}", b"[[" + b'"x",' * 2000 + b'"x"], {}, {}]'),
        raw(f"pickle-{uuid.uuid4()}", b"\x80\x04K\x01.", "application/x-python-serialize"),
        raw(f"shape-{uuid.uuid4()}", b"[[1], {}]"),
    ]
    try:
        good = [echo.delay(1)]
        for envelope in bad:
            app.broker.publish(envelope, queue="celery")
        good.append(echo.delay(2))
        with running(app, pool="threads", concurrency=2) as (worker, thread):
            assert [r.get(timeout=30) for r in good] == [1, 2]
            eventually(lambda: worker.stats["dead_lettered"] == len(bad), 30)
            assert thread.is_alive()
        assert app.backend.fetch_many([e.id for e in bad]) == {}
        assert _settled(app) == (0, len(bad))
    finally:
        app.close()


# ---------------------------------------------------------------- class 6: any decode error


def test_headers_that_are_not_a_map_never_loop_and_never_stop_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app("memory", tmp_path)

    @app.task(name="fp.echo")
    def echo(n: int) -> int:
        return n

    odd = Envelope(id=f"list-headers-{uuid.uuid4()}", body=b"[[], {}, {}]", headers=["x", 1])  # type: ignore[arg-type]
    try:
        good = [echo.delay(i) for i in range(3)]
        app.broker.publish(odd, queue="celery")
        good += [echo.delay(i) for i in range(3, 6)]
        caplog.set_level(logging.ERROR, logger="conveyor.worker")
        with running(app, pool="threads", concurrency=2) as (worker, thread):
            assert [r.get(timeout=30) for r in good] == list(range(6))
            eventually(lambda: worker.stats["dead_lettered"] == 1, 30)
            # Absence takes a window: over two 1 s leases, a message left held (or given
            # back) would have come back and been dead-lettered again.
            time.sleep(2.5)
            assert worker.stats["dead_lettered"] == 1
            assert thread.is_alive()
        lines = [r.getMessage() for r in caplog.records]
        assert any(f"dead-lettering message {odd.id}" in line for line in lines)
        assert app.broker.size("celery") == 0
    finally:
        app.close()

"""Attacks on stored results, on every result backend (issue 13, classes 4 and 6), with a
real worker (a thread; on the memory broker, except rpc://, which needs RabbitMQ).

* Ids as queries: ``AsyncResult`` and the backend's own methods with ids that are operator
  maps, lists, numbers (``0`` and ``42`` compare as numbers in MySQL), booleans, bytes, and
  strings that are patterns somewhere (``*``, ``%``, ``.*``, SQL quotes): each call raises a
  typed error or answers about that id alone; none returns the victim's result, none
  deletes it.
* Refused messages write no result (with ``security_key``): unsigned, forged, undecodable
  and oversized messages claiming the id (and, for rpc://, the reply queue) of a task that
  already finished are dead-lettered, run nothing, and leave its SUCCESS as it was.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_support import (
    BACKENDS,
    Runs,
    backend_place,
    celery_envelope,
    cleanup,
    figures,
    hostile_app,
    running,
    server_lock,
    settled,
)

from conveyor import Envelope
from conveyor.core.errors import ConveyorError
from conveyor.core.signing import Signer
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEY = "hostile-suite-signing-key-0123456789abcdef"

QUERIES: list[Any] = [
    {"$ne": None},
    {"$regex": ".*"},
    {"$gt": ""},
    {"$exists": True},
    ["victim"],
    ("victim",),
    0,
    42,
    0.0,
    True,
    None,
    b"victim",
    "*",
    "%",
    "_",
    ".*",
    "?",
    "[a-z]*",
    "' OR '1'='1",
    '" OR ""="',
    "celery-task-meta-*",
]


def _calls(app: Any, odd: Any) -> dict[str, Any]:
    """Every way a caller can hand ``odd`` to the result backend."""
    backend = app.backend
    result = app.AsyncResult(odd)
    return {
        "state": lambda: result.state,
        "result": lambda: result.result,
        "ready": lambda: result.ready(),
        "get": lambda: result.get(timeout=0.2, propagate=False),
        "fetch": lambda: backend.fetch(odd),
        "fetch_many": lambda: backend.fetch_many([odd]),
        "fetch_many_bare": lambda: backend.fetch_many(odd),
        "fetch_group": lambda: backend.fetch_group(odd),
        "forget": lambda: result.forget(),
        "forget_group": lambda: backend.forget_group(odd),
    }


def _leaks(value: Any, victim: str) -> bool:
    text = repr(value)
    return victim in text or "mine" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_that_are_queries_never_read_or_delete_another_tasks_result(
    backend: str, tmp_path: Path
) -> None:
    where = backend_place(backend, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("q4")
    app, tasks = hostile_app(where, runs, task_default_queue=queue)
    tried = refused = 0
    with server_lock(where):
        try:
            with running(app, queues=[queue], concurrency=1):
                # The victim: a real task's stored result (rpc://: in this client's queue).
                victim_result = tasks["count"].apply_async(("mine",))
                assert victim_result.get(timeout=60) == "mine"
                victim = victim_result.id
                for odd in QUERIES:
                    for name, call in _calls(app, odd).items():
                        tried += 1
                        try:
                            value = call()
                        except ConveyorError:
                            refused += 1
                            continue
                        except (TypeError, ValueError) as exc:
                            pytest.fail(f"{name}({odd!r}) raised untyped {exc!r}")
                        assert not _leaks(value, victim), (name, odd, value)
                    # still there, unchanged, after every call on this id
                    record = app.backend.fetch(victim)
                    assert record is not None, f"{odd!r} deleted the victim"
                    assert (record.state, record.result) == (State.SUCCESS, "mine"), odd
        finally:
            app.close()
            cleanup(where, queue)
    figures("4-ids-as-queries", backend, bad_inputs=tried, refused=refused, lost=0, leaked=0)


def _attacks(app: Any, victim: Any, queue: str) -> dict[str, Envelope]:
    """Messages claiming ``victim``'s id (and reply queue), none signed with the key."""
    base = celery_envelope("h.count", victim.id, args=("forged",))
    base = dataclasses.replace(base, reply_to=app.oid, correlation_id=victim.id)
    too_big = b"[[" + b'"x",' * 40_000 + b'"x"], {}, {}]'
    return {
        "unsigned": base,
        "forged-signature": Signer("an-attackers-own-key-0123456789ab").sign(base),
        "stale-signature": dataclasses.replace(
            Signer(KEY).sign(celery_envelope("h.count", unique_name("other"))),
            headers={**Signer(KEY).sign(base).headers, "id": victim.id, "argsrepr": "x"},
        ),
        "undecodable": dataclasses.replace(base, body=b"\x00\xff not json"),
        "oversized": dataclasses.replace(base, body=too_big),
        "unknown-task": dataclasses.replace(base, headers={**base.headers, "task": "h.nobody"}),
        "signature-not-text": dataclasses.replace(
            base, headers={**base.headers, "x-conveyor-signature": {"$ne": None}}
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_messages_claiming_a_finished_tasks_id_leave_its_result_unchanged(
    backend: str, tmp_path: Path
) -> None:
    where = backend_place(backend, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("q6")
    app, tasks = hostile_app(
        where, runs, task_default_queue=queue, security_key=KEY, worker_max_message_size=64_000
    )
    started = time.monotonic()
    with server_lock(where):
        try:
            with running(app, queues=[queue], concurrency=2) as (worker, thread):
                victim = tasks["count"].apply_async(("mine",))
                assert victim.get(timeout=60) == "mine"
                before = app.backend.fetch(victim.id)
                assert before is not None
                attacks = _attacks(app, victim, queue)
                for envelope in attacks.values():
                    app.broker.publish(envelope, queue=queue)
                after = tasks["count"].apply_async((1,))
                assert after.get(timeout=60) == 1
                eventually(
                    lambda: worker.stats["dead_lettered"] >= len(attacks), 60,
                    message="every refused message dead-lettered",
                )  # fmt: skip
                assert thread.is_alive()
                record = app.backend.fetch(victim.id)
                assert record is not None
                assert (record.state, record.result) == (State.SUCCESS, "mine"), record
                assert record.date_done == before.date_done
                assert victim.get(timeout=5) == "mine"
            assert runs.count(victim.id) == 1  # the forgeries ran nothing
            assert worker.stats["dead_lettered"] == len(attacks)
            assert settled(app, queue) == (0, len(attacks))
        finally:
            app.close()
            cleanup(where, queue)
    figures(
        "6-refused-writes-nothing", backend, bad_inputs=len(attacks), executions=1,
        overwritten=0, lost=0, seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip


def test_a_stored_result_is_what_the_attack_checks_against() -> None:
    """Guard on the suite: the victim check would see an overwrite."""
    a = ResultRecord(task_id="t", state=State.SUCCESS, result="mine")
    b = dataclasses.replace(a, state=State.FAILURE, result={"exc_type": "X"})
    assert (a.state, a.result) != (b.state, b.result)


#: Per backend: ids a Celery client can send that this result store refuses.
STORE_REFUSES = {
    "memory": ["nul\x00{u}", "\ud800{u}", "m" * 1100 + "{u}"],
    "sqlite": ["x" * 200 + "{u}", "nul\x00{u}"],
    "postgres": ["x" * 200 + "{u}", "nul\x00{u}"],
    "mysql": ["x" * 200 + "{u}", "\ud800{u}"],
    "redis": ["z" * 1100 + "{u}", "\ud800{u}"],
    "rpc": ["r" * 300 + "{u}", "nul\x00{u}"],
    "mongodb": ["z" * 1100 + "{u}", "nul\x00{u}"],
    "memcached": ["a space {u}", "ctrl\x01{u}", "non-ascii-\u00e9{u}", "m" * 240 + "{u}"],
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_the_result_store_refuses_run_once_and_never_loop(backend: str, tmp_path: Path) -> None:
    """Class 1 on every result backend: a Celery client's task id this store cannot hold
    runs once; the worker says it cannot store the result and acks."""
    where = backend_place(backend, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("q1")
    app, tasks = hostile_app(where, runs, task_default_queue=queue)
    odd_ids = [template.format(u=unique_name("")) for template in STORE_REFUSES[backend]]
    sent = []
    with server_lock(where):
        try:
            app.broker.declare_queue(queue)
            for odd in odd_ids:
                with pytest.raises(ConveyorError):
                    app.backend.validate_task_id(odd)  # refused, so nothing can be stored
                envelope = celery_envelope("h.count", odd, args=(1,))
                envelope = dataclasses.replace(envelope, reply_to=app.oid, correlation_id=None)
                try:
                    app.broker.publish(envelope, queue=queue)
                except ConveyorError as exc:  # RabbitMQ cannot carry a lone surrogate
                    assert "utf-8" in str(exc).lower(), exc  # noqa: PT017
                    continue
                sent.append(odd)
            after = tasks["count"].apply_async((2,))
            with running(app, queues=[queue]) as (worker, thread):
                assert after.get(timeout=60) == 2
                eventually(
                    lambda: worker.stats["unstorable_results"] == len(sent), 60,
                    message="every odd id ran and was settled without a result",
                )  # fmt: skip
                assert tasks["count"].apply_async((3,)).get(timeout=60) == 3
                assert thread.is_alive()
            assert [runs.count(odd) for odd in sent] == [1] * len(sent)
            assert settled(app, queue) == (0, 0)
        finally:
            app.close()
            cleanup(where, queue)
    figures(
        "1-ids-the-store-refuses", backend, bad_inputs=len(odd_ids), sent=len(sent),
        executions=sum(runs.count(o) for o in sent), duplicated=0, lost=0,
    )  # fmt: skip

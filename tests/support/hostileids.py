"""Hostile ids and closed clients against any result backend (issue 13): the checks the
per-service test files (``test_*_result_ids.py``) run on their backend.

* Ids that are not strings (MongoDB operators, ints, bytes, None, lists) are refused with
  ``ConfigurationError`` by every method that takes an id, and reach nothing: the per-service
  files also run them against a backend whose server is unreachable, where anything that
  reached the driver would raise ``OperationalError`` instead.
* Odd strings (spaces, control characters, NUL, a lone surrogate, 10,000 characters, Unicode)
  are either stored and read back exactly by every method, or refused with
  ``ConfigurationError`` by every method, ``validate_task_id`` included, and never raise
  anything else.
* Ids that some collation or key scheme could confuse (case, accents, trailing spaces) never
  read or overwrite each other.
* A closed backend raises ``ConnectionLost`` from every method it declares.
* ``wait`` (where declared) is woken within 250 ms of a store from another client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    EncodeError,
)
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import unique_name

__all__ = [
    "LOOKALIKES",
    "NOT_STRINGS",
    "ODD_IDS",
    "assert_closed_backend_raises_connection_lost",
    "assert_lookalikes_never_meet",
    "assert_odd_id_is_exact_or_refused",
    "assert_refused_everywhere",
    "assert_unencodable_result_is_an_encode_error",
    "assert_wait_wakes_within",
    "id_calls",
    "odd_id",
]

#: Ids that are not strings: each is refused by every method.
NOT_STRINGS: list[Any] = [
    {"$ne": None},
    {"$regex": "."},
    {"$gt": ""},
    5,
    0,
    1.5,
    True,
    b"a-bytes-id",
    None,
    ["a-list-id"],
    ("a-tuple-id",),
]

#: Odd strings, by name: ``odd_id(name)`` makes a unique id of that shape.
ODD_IDS: dict[str, Callable[[str], str]] = {
    "space inside": lambda u: f"{u} with space",
    "leading space": lambda u: f" {u}",
    "trailing space": lambda u: f"{u} ",
    "tab": lambda u: f"{u}\ttab",
    "newline": lambda u: f"{u}\nline",
    "carriage return": lambda u: f"{u}\rcr",
    "NUL": lambda u: f"{u}\x00nul",
    "DEL": lambda u: f"{u}\x7fdel",
    "lone surrogate": lambda u: f"{u}\ud800x",
    "escaped surrogate": lambda u: f"{u}\udcff",
    "10,000 characters": lambda u: u + "x" * (10_000 - len(u)),
    "1025 UTF-8 bytes": lambda u: u + "é" * ((1025 - len(u)) // 2) + "x" * ((1025 - len(u)) % 2),
    "255 characters": lambda u: u + "y" * (255 - len(u)),
    "155 characters": lambda u: u + "z" * (155 - len(u)),
    "156 characters": lambda u: u + "z" * (156 - len(u)),
    "accents and emoji": lambda u: f"{u}-tâche-é-ß-\U0001f600",
    "right-to-left": lambda u: f"{u}-\u0645\u0647\u0645\u0629",
    "SQL and Mongo syntax": lambda u: f"{u}'; DROP TABLE x; --$where.a%_\\",
    "JSON-looking": lambda u: f'{{"$ne": null, "u": "{u}"}}',
    "key separators": lambda u: f"{u}:celery-task-meta-*?[]",
}


def odd_id(name: str) -> str:
    """A unique id of the shape ``name`` in :data:`ODD_IDS`."""
    return ODD_IDS[name](unique_name("odd"))


#: Pairs that a case- or accent-insensitive collation, or PAD SPACE, would take for one id.
LOOKALIKES: list[tuple[str, str]] = [
    ("abc-{u}", "ABC-{u}"),
    ("e-{u}", "é-{u}"),
    ("a-{u}", "a-{u} "),
    ("ss-{u}", "ß-{u}"),
]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _record(task_id: Any, result: Any = "ok", state: State = State.SUCCESS) -> ResultRecord:
    done = _now() if state in (State.SUCCESS, State.FAILURE) else None
    return ResultRecord(task_id, state, result, date_done=done, children=[])


def _caps(backend: Any) -> frozenset[Capability]:
    return frozenset(type(backend).capabilities)


def id_calls(backend: Any, bad: Any) -> list[tuple[str, Callable[[], object]]]:
    """Every call of ``backend`` that takes an id, with ``bad`` in that place (once per
    place), for the methods the backend declares. The other ids are ordinary."""
    good = unique_name("good")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("validate_task_id", lambda: backend.validate_task_id(bad)),
        ("store", lambda: backend.store(_record(bad), ttl=60)),
        ("fetch", lambda: backend.fetch(bad)),
        ("fetch_many", lambda: backend.fetch_many([good, bad])),
        ("forget", lambda: backend.forget(bad)),
    ]
    caps = _caps(backend)
    if Capability.WAIT in caps:
        calls.append(("wait", lambda: backend.wait(bad, 0.05)))
    if Capability.COUNTERS in caps:
        calls += [
            ("incr", lambda: backend.incr(bad, 1, ttl=60)),
            ("add_member key", lambda: backend.add_member(bad, good, ttl=60)),
            ("add_member member", lambda: backend.add_member(good, bad, ttl=60)),
            ("forget_key", lambda: backend.forget_key(bad)),
        ]
    if Capability.GROUPS in caps:
        calls += [
            ("store_group id", lambda: backend.store_group(GroupRecord(bad, (good,)), ttl=60)),
            ("store_group member", lambda: backend.store_group(GroupRecord(good, (bad,)), ttl=60)),
            ("fetch_group", lambda: backend.fetch_group(bad)),
            ("forget_group", lambda: backend.forget_group(bad)),
        ]
    return calls


def assert_refused_everywhere(backend: Any, bad: Any) -> None:
    """Every id-taking call raises ``ConfigurationError`` (never another exception) with a
    message that says what is wrong."""
    for name, call in id_calls(backend, bad):
        with pytest.raises(ConfigurationError) as info:
            call()
        assert "id" in str(info.value) or "key" in str(info.value) or "member" in str(info.value), (
            f"{name}: {info.value}"
        )


def assert_odd_id_is_exact_or_refused(backend: Any, task_id: str) -> bool:
    """Either every method refuses ``task_id`` with ``ConfigurationError`` (return False),
    or it is stored and read back exactly by every method (return True)."""
    try:
        backend.validate_task_id(task_id)
    except ConfigurationError:
        for name, call in id_calls(backend, task_id):
            with pytest.raises(ConfigurationError):
                call()
            assert name  # shown in the traceback of a failure
        return False
    caps = _caps(backend)
    payload = {"id": task_id, "n": 1}
    backend.store(_record(task_id, payload), ttl=60)
    got = backend.fetch(task_id)
    assert got is not None, f"{task_id!r} was stored but is not found"
    assert got.task_id == task_id
    assert got.result == payload
    many = backend.fetch_many([task_id])
    assert list(many) == [task_id]
    assert many[task_id].result == payload
    if Capability.WAIT in caps:
        waited = backend.wait(task_id, 5.0)
        assert waited is not None
        assert waited.result == payload
    if Capability.GROUPS in caps:
        backend.store_group(GroupRecord(task_id, (task_id, "plain-member")), ttl=60)
        group = backend.fetch_group(task_id)
        assert group is not None
        assert group.group_id == task_id
        assert tuple(group.task_ids) == (task_id, "plain-member")
        backend.forget_group(task_id)
        assert backend.fetch_group(task_id) is None
    if Capability.COUNTERS in caps:
        assert backend.incr(task_id, 2, ttl=60) == 2
        assert backend.incr(task_id, 3, ttl=60) == 5
        backend.forget_key(task_id)
        members = unique_name("members")
        assert backend.add_member(members, task_id, ttl=60) == 1
        assert backend.add_member(members, task_id, ttl=60) == 1
        backend.forget_key(members)
    backend.forget(task_id)
    assert backend.fetch(task_id) is None
    return True


def assert_lookalikes_never_meet(backend: Any) -> None:
    """For each pair of :data:`LOOKALIKES`: storing both either keeps two records, each
    read back exactly, or refuses the second with ``ConfigurationError`` and leaves the first
    untouched. A read or a delete of one never returns or removes the other."""
    for first_t, second_t in LOOKALIKES:
        u = unique_name("look")
        first, second = first_t.format(u=u), second_t.format(u=u)
        backend.store(_record(first, "first"), ttl=60)
        try:
            backend.validate_task_id(second)
        except ConfigurationError:
            with pytest.raises(ConfigurationError):
                backend.fetch(second)
        else:
            fetched = backend.fetch(second)
            assert fetched is None, f"fetch({second!r}) returned the record of {first!r}"
            assert list(backend.fetch_many([second])) == []
            backend.forget(second)  # must not delete the first
            kept = backend.fetch(first)
            assert kept is not None, f"forget({second!r}) deleted {first!r}"
            try:
                backend.store(_record(second, "second"), ttl=60)
            except ConfigurationError:
                pass  # the store cannot tell them apart and says so
            else:
                got = backend.fetch(second)
                assert got is not None
                assert (got.task_id, got.result) == (second, "second")
                backend.forget(second)
        got = backend.fetch(first)
        assert got is not None
        assert (got.task_id, got.result) == (first, "first")
        backend.forget(first)


def _valid_calls(backend: Any) -> list[tuple[str, Callable[[], object]]]:
    task_id = unique_name("closed")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("store", lambda: backend.store(_record(task_id), ttl=60)),
        ("fetch", lambda: backend.fetch(task_id)),
        ("fetch_many", lambda: backend.fetch_many([task_id])),
        ("forget", lambda: backend.forget(task_id)),
    ]
    caps = _caps(backend)
    if Capability.WAIT in caps:
        calls.append(("wait", lambda: backend.wait(task_id, 0.05)))
    if Capability.COUNTERS in caps:
        calls += [
            ("incr", lambda: backend.incr(task_id, 1, ttl=60)),
            ("add_member", lambda: backend.add_member(task_id, "m", ttl=60)),
            ("forget_key", lambda: backend.forget_key(task_id)),
        ]
    if Capability.GROUPS in caps:
        calls += [
            ("store_group", lambda: backend.store_group(GroupRecord(task_id, ("a",)), ttl=60)),
            ("fetch_group", lambda: backend.fetch_group(task_id)),
            ("forget_group", lambda: backend.forget_group(task_id)),
        ]
    if Capability.EXPIRY_SWEEP in caps:
        calls.append(("purge_expired", lambda: backend.purge_expired()))
    return calls


def assert_closed_backend_raises_connection_lost(backend: Any) -> None:
    """Used once, then closed twice (idempotent): every declared method raises
    ``ConnectionLost``."""
    task_id = unique_name("used")
    backend.store(_record(task_id), ttl=60)
    assert backend.fetch(task_id) is not None
    backend.close()
    backend.close()
    for name, call in _valid_calls(backend):
        with pytest.raises(ConnectionLost):
            call()
        assert name  # the name shows in the traceback of a failure


def assert_unencodable_result_is_an_encode_error(backend: Any) -> None:
    """A result the serializer cannot encode raises ``EncodeError`` (never an
    ``OperationalError``) and stores nothing; the backend keeps working."""
    task_id = unique_name("unencodable")
    with pytest.raises(EncodeError):
        backend.store(_record(task_id, object()), ttl=60)
    with pytest.raises(EncodeError):
        backend.store(_record(task_id, {"nested": {1, 2, 3}}), ttl=60)
    assert backend.fetch(task_id) is None
    backend.store(_record(task_id, "fine"), ttl=60)
    got = backend.fetch(task_id)
    assert got is not None
    assert got.result == "fine"
    backend.forget(task_id)


def assert_wait_wakes_within(
    waiter: Any, writer: Any, limit: float = 0.25, *, rounds: int = 5
) -> list[float]:
    """``waiter.wait`` returns within ``limit`` seconds of ``writer.store`` returning, for
    stores landing at several offsets after the wait began (a poll loop with an interval
    above ``limit`` misses at least one). Returns the latencies in seconds."""
    latencies: list[float] = []
    for round_ in range(rounds):
        task_id = unique_name("push")
        woke: dict[str, Any] = {}
        done = threading.Event()

        def wait_for_it(
            task_id: str = task_id, woke: dict[str, Any] = woke, done: threading.Event = done
        ) -> None:
            try:
                woke["record"] = waiter.wait(task_id, 10.0)
            finally:
                woke["at"] = time.monotonic()
                done.set()

        thread = threading.Thread(target=wait_for_it, daemon=True)
        thread.start()
        # Deliberate offsets, spread over a second: where the store lands in any interval a
        # polling implementation might use. Not a synchronisation: a wait that had not begun
        # yet would read the record at once, which also passes.
        time.sleep(0.1 + 0.17 * round_)
        writer.store(_record(task_id, round_), ttl=60)
        stored = time.monotonic()
        assert done.wait(10.0), "wait() did not return"
        thread.join()
        record = woke.get("record")
        assert record is not None
        assert record.result == round_
        latencies.append(woke["at"] - stored)
    assert max(latencies) < limit, f"wait woke {max(latencies) * 1000:.0f} ms after the store"
    return latencies

"""Result backend suite, clients: many readers, one client shared by threads, ``close`` (after
which every operation raises ``ConnectionLost``) and ``repr`` without a password.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConnectionLost, UnsupportedFeature
from conveyor.core.types import GroupRecord, State
from conveyor.core.urls import parse_url
from conveyor.testing.result_backend.base import (
    _DATE_DONE,
    MakeResultBackend,
    ResultBackendSuite,
    _assert_same_record,
    _caps,
    _record,
)
from conveyor.testing.support import requires, unique_name


class ClientChecks(ResultBackendSuite):
    """How clients share a store, share themselves, and end."""

    @requires(Capability.MULTI_READER)
    def test_any_client_may_read_a_result_any_number_of_times(
        self, new_result_backend: MakeResultBackend
    ) -> None:
        writer, first, second = new_result_backend(), new_result_backend(), new_result_backend()
        record = _record(unique_name("task"), State.SUCCESS, "again and again")
        writer.store(record)
        for reader in (first, second, first, second, writer):
            _assert_same_record(reader.fetch(record.task_id), record)

    def test_one_client_may_be_shared_by_threads(self, result_backend: Any) -> None:
        prefix = unique_name("threads")
        errors: list[str] = []

        def work(n: int) -> None:
            for i in range(25):
                record = _record(f"{prefix}-{n}-{i}", State.SUCCESS, [n, i])
                result_backend.store(record)
                got = result_backend.fetch(record.task_id)
                if got is None or got.result != [n, i]:
                    errors.append(f"{record.task_id}: {got!r}")

        self._run_threads(work)
        assert errors == []

    def test_close_is_idempotent(self, new_result_backend: MakeResultBackend) -> None:
        backend = new_result_backend()
        backend.close()
        backend.close()

    def test_every_operation_of_a_closed_backend_raises_connection_lost(
        self, new_result_backend: MakeResultBackend
    ) -> None:
        backend = new_result_backend()
        record = _record(unique_name("task"), State.SUCCESS, "before close")
        backend.store(record)  # a client that did work: its connections are open
        _assert_same_record(backend.fetch(record.task_id), record)
        backend.close()
        backend.close()
        task_id, counter, members = record.task_id, unique_name("counter"), unique_name("join")
        group = GroupRecord(unique_name("group"), (task_id,), _DATE_DONE)
        calls: dict[str, Callable[[], object]] = {
            "store": lambda: backend.store(_record(task_id, State.SUCCESS, "after close")),
            "fetch": lambda: backend.fetch(task_id),
            "fetch_many": lambda: backend.fetch_many([task_id]),
            "forget": lambda: backend.forget(task_id),
        }
        gated: dict[Capability, dict[str, Callable[[], object]]] = {
            Capability.WAIT: {"wait": lambda: backend.wait(task_id, 0.2)},
            Capability.COUNTERS: {
                "incr": lambda: backend.incr(counter),
                "add_member": lambda: backend.add_member(members, "m"),
                "forget_key": lambda: backend.forget_key(counter),
            },
            Capability.GROUPS: {
                "store_group": lambda: backend.store_group(group),
                "fetch_group": lambda: backend.fetch_group(group.group_id),
                "forget_group": lambda: backend.forget_group(group.group_id),
            },
            Capability.EXPIRY_SWEEP: {"purge_expired": lambda: backend.purge_expired()},
        }
        caps = _caps(backend)
        expected: dict[str, tuple[type[BaseException], ...]] = dict.fromkeys(
            calls, (ConnectionLost,)
        )
        for capability, operations in gated.items():
            calls.update(operations)
            # An undeclared operation may say so before it notices the client is closed.
            refusal = (
                (ConnectionLost,) if capability in caps else (ConnectionLost, UnsupportedFeature)
            )
            expected.update(dict.fromkeys(operations, refusal))
        wrong: list[str] = []
        for name, call in calls.items():
            try:
                value = call()
            except expected[name]:
                continue
            except Exception as exc:
                wrong.append(f"{name} raised {type(exc).__name__}: {exc}")
            else:
                wrong.append(f"{name} returned {value!r}")
        assert not wrong, "after close(), ConnectionLost was expected, but:\n" + "\n".join(wrong)
        backend.close()

    def test_repr_never_shows_a_password(self, result_backend: Any) -> None:
        text = repr(result_backend) + str(result_backend)
        url = getattr(result_backend, "url", "")
        password = parse_url(url).password if url else None
        if password:
            assert password not in text, "repr()/str() show the URL's password"

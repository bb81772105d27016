"""The memory result backend against the conformance suite, plus what only it promises."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from conveyor.backends.memory import (
    MemoryResultBackend,
    MemoryResultBackendOptions,
    MemoryResultStore,
)
from conveyor.core import (
    ConfigurationError,
    ConnectionLost,
    GroupRecord,
    InvalidURL,
    ResultRecord,
    State,
    result_backend_from_url,
)
from conveyor.testing.result_backend import ResultBackendConformance


class TestMemoryResultBackend(ResultBackendConformance):
    short_ttl = 0.5
    expiry_tolerance = 0.05
    expiry_timeout = 2.0

    @pytest.fixture
    def make_result_backend(self) -> Callable[..., Any]:
        store = MemoryResultStore()

        def make(**options: Any) -> Any:
            return result_backend_from_url("memory://", store=store, **options)

        return make


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _success(task_id: str, value: Any = 1) -> ResultRecord:
    return ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(timezone.utc))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend(clock: FakeClock) -> Any:
    rb = MemoryResultBackend(store=MemoryResultStore(clock=clock))
    yield rb
    rb.close()


@pytest.mark.parametrize("url", ["memory://", "cache+memory://", "MEMORY://"])
def test_both_celery_spellings_build_a_memory_result_backend(url: str) -> None:
    rb = result_backend_from_url(url)
    assert isinstance(rb, MemoryResultBackend)
    rb.close()


def test_options_come_from_the_query_and_keywords_override_them() -> None:
    assert MemoryResultBackend.from_url("memory://?default_ttl=5").default_ttl == 5.0
    assert MemoryResultBackend.from_url("memory://?default_ttl=5", default_ttl=7).default_ttl == 7
    assert MemoryResultBackend.from_url("memory://").default_ttl == 86400.0
    assert MemoryResultBackend.from_url("memory://?default_ttl=none").default_ttl is None


def test_an_unknown_option_fails_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match="default_ttl"):
        MemoryResultBackend.from_url("memory://?default_tll=5")


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_negative_or_nan_default_ttl_is_refused(bad: float) -> None:
    with pytest.raises(ConfigurationError):
        MemoryResultBackendOptions(default_ttl=bad)


def test_a_non_memory_url_is_refused() -> None:
    with pytest.raises(InvalidURL):
        MemoryResultBackend.from_url("redis://localhost/0")


def test_each_backend_built_from_a_url_has_its_own_store() -> None:
    first, second = (
        MemoryResultBackend.from_url("memory://"),
        MemoryResultBackend.from_url("memory://"),
    )
    first.store(_success("t1"))
    assert second.fetch("t1") is None
    shared = MemoryResultBackend(store=first.memory_store)
    assert shared.fetch("t1") is not None


def test_repr_masks_a_password_in_the_url() -> None:
    rb = MemoryResultBackend.from_url("cache+memory://user:s3cr3t@localhost/")
    assert "s3cr3t" not in repr(rb)
    assert "***" in repr(rb)


def test_a_negative_ttl_is_refused(backend: Any) -> None:
    with pytest.raises(ConfigurationError):
        backend.store(_success("t"), ttl=-1.0)


def test_an_empty_task_id_is_refused(backend: Any) -> None:
    with pytest.raises(ConfigurationError):
        backend.store(_success(""))


def test_a_state_given_as_a_string_comes_back_as_a_state_member(backend: Any) -> None:
    backend.store(ResultRecord("t", "FAILURE", None))  # type: ignore[arg-type]
    assert backend.fetch("t").state is State.FAILURE


def test_stored_values_are_isolated_from_the_caller(backend: Any) -> None:
    value = {"items": [1, 2]}
    backend.store(_success("t", value))
    value["items"].append(3)
    fetched = backend.fetch("t")
    assert fetched.result == {"items": [1, 2]}
    fetched.result["items"].append(4)
    assert backend.fetch("t").result == {"items": [1, 2]}


def test_a_zero_or_none_default_ttl_keeps_records_until_forgotten(clock: FakeClock) -> None:
    rb = MemoryResultBackend(
        MemoryResultBackendOptions(default_ttl=None), store=MemoryResultStore(clock=clock)
    )
    rb.store(_success("t"))
    clock.now += 10 * 365 * 86400
    assert rb.fetch("t") is not None


def test_a_record_expires_exactly_at_its_deadline(backend: Any, clock: FakeClock) -> None:
    backend.store(_success("t"), ttl=10.0)
    clock.now += 9.999
    assert backend.fetch("t") is not None
    clock.now += 0.001
    assert backend.fetch("t") is None


def test_writes_remove_expired_entries_nobody_reads(backend: Any, clock: FakeClock) -> None:
    store = backend.memory_store
    for i in range(100):
        backend.store(_success(f"old-{i}"), ttl=1.0)
    backend.store_group(GroupRecord("g", ("old-0",)), ttl=1.0)
    backend.incr("counter", ttl=1.0)
    assert len(store) == 102
    clock.now += 2.0
    for i in range(10):
        backend.store(_success(f"new-{i}"), ttl=60.0)
    assert len(store) == 10, "expired entries stayed in memory although writes went on"


def test_the_default_ttl_applies_to_records_groups_and_counters(clock: FakeClock) -> None:
    rb = MemoryResultBackend.from_url(
        "memory://", store=MemoryResultStore(clock=clock), default_ttl=5.0
    )
    rb.store(_success("t"))
    rb.store_group(GroupRecord("g", ("t",)))
    rb.add_member("k", "m")
    clock.now += 5.0
    assert rb.fetch("t") is None
    assert rb.fetch_group("g") is None
    assert rb.add_member("k", "other") == 1


def test_purge_expired_counts_every_expired_entry_once(backend: Any, clock: FakeClock) -> None:
    for i in range(7):
        backend.store(_success(f"t{i}"), ttl=1.0)
    backend.store_group(GroupRecord("g", ("t0",)), ttl=1.0)
    backend.incr("c", ttl=1.0)
    backend.store(_success("keep"), ttl=100.0)
    clock.now += 1.5
    assert backend.fetch("t0") is None  # removed by the read, not counted by the sweep
    assert backend.purge_expired(batch_size=2) == 8
    assert backend.purge_expired(batch_size=2) == 0
    assert len(backend.memory_store) == 1


def test_purge_expired_holds_the_lock_for_at_most_batch_size_entries(
    backend: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(10):
        backend.store(_success(f"t{i}"), ttl=1.0)
    clock.now += 2.0
    store = backend.memory_store
    sweep = store._sweep
    batches: list[int] = []

    def counting_sweep(now: float, budget: int) -> tuple[int, bool]:
        deleted, more = sweep(now, budget)
        batches.append(deleted)
        return deleted, more

    monkeypatch.setattr(store, "_sweep", counting_sweep)
    assert backend.purge_expired(batch_size=3) == 10
    assert batches == [3, 3, 3, 1]


def test_purge_expired_refuses_a_batch_size_below_one(backend: Any) -> None:
    with pytest.raises(ConfigurationError):
        backend.purge_expired(batch_size=0)


def test_a_refreshed_counter_outlives_its_first_deadline(backend: Any, clock: FakeClock) -> None:
    backend.add_member("k", "a", ttl=1.0)
    backend.add_member("k", "b", ttl=10.0)
    clock.now += 5.0
    assert backend.purge_expired() == 0
    assert backend.add_member("k", "b", ttl=10.0) == 2
    clock.now += 10.0
    assert backend.purge_expired() == 1


def test_a_counter_and_a_set_cannot_share_a_key(backend: Any) -> None:
    backend.incr("k")
    with pytest.raises(ConfigurationError):
        backend.add_member("k", "m")
    backend.add_member("s", "m")
    with pytest.raises(ConfigurationError):
        backend.incr("s")


def test_incr_refuses_a_non_integer_amount(backend: Any) -> None:
    with pytest.raises(ConfigurationError):
        backend.incr("k", 1.5)
    with pytest.raises(ConfigurationError):
        backend.incr("k", True)


def test_a_closed_client_refuses_operations_but_the_store_lives_on(backend: Any) -> None:
    other = MemoryResultBackend(store=backend.memory_store)
    backend.store(_success("t"))
    backend.close()
    with pytest.raises(ConnectionLost):
        backend.fetch("t")
    assert other.fetch("t") is not None


def test_closing_a_client_ends_its_pending_wait() -> None:
    rb = MemoryResultBackend()
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            rb.wait("never", 30.0)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(timeout=0.2)
    rb.close()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionLost)


def test_waiters_for_other_ids_are_not_left_registered(backend: Any) -> None:
    backend.store(_success("t"))
    backend.wait("t", 1.0)
    backend.wait("missing", 0.01)
    assert backend.memory_store._waiters == {}

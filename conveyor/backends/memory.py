"""In-process result backend: ``memory://`` and ``cache+memory://``.

For tests, demos and single-process apps. Records live in a :class:`MemoryResultStore` owned
by the backend instance (no module-level state): two backends built from the same URL do
*not* share results unless they are given the same store
(``MemoryResultBackend.from_url("memory://", store=other.memory_store)``).

Capabilities:
    * ``native_ttl``: every entry carries a deadline on a monotonic clock; reads treat a
      passed deadline as absent and delete the entry, and every write also deletes up to
      a small budget of entries whose deadline passed (an expiry heap), so memory stays
      bounded without anyone calling :meth:`~MemoryResultBackend.purge_expired`.
    * ``expiry_sweep``: :meth:`~MemoryResultBackend.purge_expired` deletes everything that
      expired, ``batch_size`` entries per lock acquisition.
    * ``wait``: :meth:`~MemoryResultBackend.wait` blocks on a condition variable that a store
      of a ready state notifies (push, no polling).
    * ``counters``: :meth:`~MemoryResultBackend.incr` and the idempotent
      :meth:`~MemoryResultBackend.add_member`, atomic under the store's lock, with a TTL.
    * ``groups``: ``store_group`` / ``fetch_group`` / ``forget_group``.
    * ``multi_reader``: any client of the store may read any record any number of times.
    * Not ``cross_process`` (another process, a forked child included, has its own copy) and
      not ``durable`` (everything is gone when the process exits).

URL:
    ``memory://`` or ``cache+memory://`` (Celery's spelling). Host, path and credentials are
    ignored (a password never shows in ``repr``); the query string carries options, e.g.
    ``memory://?default_ttl=3600``.

Options (keyword > URL query > default, see :func:`conveyor.core.options.build_options`):
    default_ttl (float seconds or None, default 86400.0): lifetime of a record, group or
        counter stored with ``ttl=None``. ``None`` or ``0`` keeps entries until forgotten;
        that must be asked for explicitly (no "forever" default).
    serializer (str, default ``json``): the result serializer every record must be
        encodable with (see Values).

Values:
    Records are stored as given, not serialized: ``result``, ``children`` and ``extended``
    are deep-copied on the way in and on the way out, so no caller shares mutable state with
    the store (as with a serializing backend). ``store`` does encode the record's meta
    document with ``serializer`` once and raises :class:`~conveyor.core.errors.EncodeError`
    when it cannot, exactly where a real store would: a task whose return value JSON cannot
    carry fails here as it would on Redis, instead of working only in tests.

Ids:
    The rules of :meth:`~conveyor.core.base.ResultBackendBase.validate_task_id` (a non-empty
    ``str``, no NUL, valid UTF-8, at most 1024 bytes), for task ids, group ids, group members
    and counter keys on every method; a refused id raises
    :class:`~conveyor.core.errors.ConfigurationError` and touches nothing. Every other id is
    stored and read back exactly.

Thread-safety:
    A backend instance may be shared by the threads of one process, and any number of
    instances may share one store; every operation takes the store's single lock for a short,
    bounded time (``wait`` releases it while blocked). Never share across ``fork()``.
    After :meth:`~MemoryResultBackend.close`, operations raise
    :class:`~conveyor.core.errors.ConnectionLost`; the store itself stays usable by its other
    clients.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase
from conveyor.core.capabilities import Capability
from conveyor.core.celery import meta_from_record
from conveyor.core.errors import ConfigurationError, ConnectionLost, InvalidURL
from conveyor.core.options import build_options
from conveyor.core.protocols import describe
from conveyor.core.serializers import default_serializers
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.core.urls import mask_url, parse_url

__all__ = ["MemoryResultBackend", "MemoryResultBackendOptions", "MemoryResultStore"]

_SCHEMES: Final = frozenset({"memory", "cache+memory"})
#: Most expired heap entries a single write removes (amortised cleanup).
_WRITE_SWEEP_BUDGET: Final = 32
_ATOMIC = (str, int, float, bool, bytes, type(None))

_Namespace = Literal["result", "group", "key"]


def _check_seconds(value: float | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{what} must be a number of seconds or None, got {value!r}")
    if value < 0 or math.isnan(value):
        raise ConfigurationError(f"{what} must be a non-negative number of seconds: {value!r}")


@dataclass(frozen=True)
class MemoryResultBackendOptions:
    """Options of :class:`MemoryResultBackend`.

    Attributes:
        default_ttl: seconds an entry stored with ``ttl=None`` lives; ``None`` or ``0``
            keeps it until forgotten (explicit configuration only).
        serializer: the result serializer a stored record must be encodable with.
    """

    default_ttl: float | None = DEFAULT_RESULT_TTL
    serializer: str = "json"

    def __post_init__(self) -> None:
        _check_seconds(self.default_ttl, "default_ttl")
        default_serializers.get(self.serializer)  # unknown or missing: fail now


class _Entry:
    """One stored value with its deadline and its scheduled slot in the expiry heap."""

    __slots__ = ("expires_at", "scheduled_at", "scheduled_seq", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.expires_at: float | None = None
        self.scheduled_at: float | None = None
        self.scheduled_seq: int | None = None


class _Waiters:
    __slots__ = ("condition", "count")

    def __init__(self, lock: threading.Lock) -> None:
        self.condition = threading.Condition(lock)
        self.count = 0


class MemoryResultStore:
    """The data behind one or more :class:`MemoryResultBackend` clients.

    Build one and pass it as ``store=`` to several backends to give them a shared view (two
    "clients" of one server in tests). Thread-safe: one lock guards everything.

    Args:
        clock: monotonic seconds used for expiry; injectable for deterministic tests.
            ``wait`` timeouts always use :func:`time.monotonic`.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tables: dict[_Namespace, dict[str, _Entry]] = {"result": {}, "group": {}, "key": {}}
        # (due, seq, namespace, key); an item is live while its entry's scheduled_seq == seq.
        self._heap: list[tuple[float, int, _Namespace, str]] = []
        self._seq = itertools.count()
        self._waiters: dict[str, _Waiters] = {}

    def __len__(self) -> int:
        """Entries held (results, groups, counters), expired ones not yet removed included."""
        with self._lock:
            return sum(len(table) for table in self._tables.values())

    def __repr__(self) -> str:
        return f"<MemoryResultStore at {id(self):#x}>"

    # ---- expiry bookkeeping (callers hold the lock)
    def _live(self, namespace: _Namespace, key: str, now: float) -> _Entry | None:
        table = self._tables[namespace]
        entry = table.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
            del table[key]
            return None
        return entry

    def _set_expiry(
        self, namespace: _Namespace, key: str, entry: _Entry, ttl: float | None, now: float
    ) -> None:
        entry.expires_at = None if ttl is None else now + ttl
        self._schedule(namespace, key, entry)

    def _schedule(self, namespace: _Namespace, key: str, entry: _Entry) -> None:
        due = entry.expires_at
        if due is None:
            return  # a scheduled item, if any, is dropped when it comes due
        if entry.scheduled_at is not None and entry.scheduled_at <= due:
            return  # lazy: that item reschedules itself to the later deadline when it pops
        seq = next(self._seq)
        heapq.heappush(self._heap, (due, seq, namespace, key))
        entry.scheduled_at, entry.scheduled_seq = due, seq

    def _sweep(self, now: float, budget: int) -> tuple[int, bool]:
        """Pop up to ``budget`` due heap items; return (entries deleted, more are due)."""
        deleted = 0
        heap = self._heap
        while budget > 0 and heap and heap[0][0] <= now:
            _, seq, namespace, key = heapq.heappop(heap)
            budget -= 1
            table = self._tables[namespace]
            entry = table.get(key)
            if entry is None or entry.scheduled_seq != seq:
                continue  # stale: the entry was deleted or rescheduled earlier
            entry.scheduled_at = entry.scheduled_seq = None
            if entry.expires_at is None:
                continue
            if entry.expires_at <= now:
                del table[key]
                deleted += 1
            else:
                self._schedule(namespace, key, entry)
        return deleted, bool(heap) and heap[0][0] <= now

    def _write_now(self) -> float:
        """The clock for a write, after the amortised cleanup (callers hold the lock)."""
        now = self._clock()
        self._sweep(now, _WRITE_SWEEP_BUDGET)
        return now

    # ---- results
    def store(self, record: ResultRecord, ttl: float | None) -> None:
        with self._lock:
            now = self._write_now()
            entry = self._live("result", record.task_id, now)
            if entry is not None:
                if entry.value.state == State.SUCCESS:
                    return  # a redelivered duplicate never replaces a finished result
                entry.value = record
            else:
                entry = self._tables["result"][record.task_id] = _Entry(record)
            self._set_expiry("result", record.task_id, entry, ttl, now)
            if record.state in (State.SUCCESS, State.FAILURE, State.REVOKED):
                waiters = self._waiters.get(record.task_id)
                if waiters is not None:
                    waiters.condition.notify_all()

    def fetch_many(self, task_ids: Sequence[str]) -> dict[str, ResultRecord]:
        found: dict[str, ResultRecord] = {}
        with self._lock:
            now = self._clock()
            for task_id in task_ids:
                entry = self._live("result", task_id, now)
                if entry is not None:
                    found[task_id] = entry.value
        return found

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._tables["result"].pop(task_id, None)

    def wait(
        self, task_id: str, timeout: float, cancelled: Callable[[], bool]
    ) -> ResultRecord | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            waiters = self._waiters.get(task_id)
            if waiters is None:
                waiters = self._waiters[task_id] = _Waiters(self._lock)
            waiters.count += 1
            try:
                while True:
                    entry = self._live("result", task_id, self._clock())
                    record: ResultRecord | None = None if entry is None else entry.value
                    if record is not None and record.ready:
                        return record
                    if cancelled():
                        raise ConnectionLost("the result backend was closed during wait()")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return record
                    waiters.condition.wait(remaining)
            finally:
                waiters.count -= 1
                if waiters.count == 0:
                    del self._waiters[task_id]

    def wake_all(self) -> None:
        """Wake every waiter so it re-checks its state (used by ``close``)."""
        with self._lock:
            for waiters in self._waiters.values():
                waiters.condition.notify_all()

    # ---- counters and sets
    def incr(self, key: str, amount: int, ttl: float | None) -> int:
        with self._lock:
            now = self._write_now()
            entry = self._live("key", key, now)
            if entry is None:
                entry = self._tables["key"][key] = _Entry(0)
            elif not isinstance(entry.value, int):
                raise ConfigurationError(f"key {key!r} holds a set (add_member), not a counter")
            entry.value += amount
            self._set_expiry("key", key, entry, ttl, now)
            value: int = entry.value
            return value

    def add_member(self, key: str, member: str, ttl: float | None) -> int:
        with self._lock:
            now = self._write_now()
            entry = self._live("key", key, now)
            if entry is None:
                entry = self._tables["key"][key] = _Entry(set())
            elif not isinstance(entry.value, set):
                raise ConfigurationError(f"key {key!r} holds a counter (incr), not a set")
            entry.value.add(member)
            self._set_expiry("key", key, entry, ttl, now)
            return len(entry.value)

    def forget_key(self, key: str) -> None:
        with self._lock:
            self._tables["key"].pop(key, None)

    # ---- groups
    def store_group(self, record: GroupRecord, ttl: float | None) -> None:
        with self._lock:
            now = self._write_now()
            entry = self._live("group", record.group_id, now)
            if entry is None:
                entry = self._tables["group"][record.group_id] = _Entry(record)
            else:
                entry.value = record
            self._set_expiry("group", record.group_id, entry, ttl, now)

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        with self._lock:
            entry = self._live("group", group_id, self._clock())
            record: GroupRecord | None = None if entry is None else entry.value
            return record

    def forget_group(self, group_id: str) -> None:
        with self._lock:
            self._tables["group"].pop(group_id, None)

    # ---- sweeping
    def purge_expired(self, batch_size: int) -> int:
        """Delete every expired entry, ``batch_size`` heap items per lock hold."""
        total = 0
        more = True
        while more:
            with self._lock:
                deleted, more = self._sweep(self._clock(), batch_size)
            total += deleted
        return total


def _isolated(record: ResultRecord) -> ResultRecord:
    """A copy of ``record`` that shares no mutable value with it."""
    if isinstance(record.result, _ATOMIC) and not record.children and not record.extended:
        return record
    return dataclasses.replace(
        record,
        result=copy.deepcopy(record.result),
        children=copy.deepcopy(record.children),
        extended=copy.deepcopy(dict(record.extended)),
    )


class MemoryResultBackend(ResultBackendBase):
    """Result backend keeping records in process memory. See the module docstring.

    Args:
        options: typed options; defaults when omitted.
        store: the store to use; a new private one when omitted.
        url: the URL it was built from (shown masked in ``repr``).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.NATIVE_TTL,
            Capability.EXPIRY_SWEEP,
            Capability.WAIT,
            Capability.COUNTERS,
            Capability.GROUPS,
            Capability.MULTI_READER,
        }
    )

    def __init__(
        self,
        options: MemoryResultBackendOptions | None = None,
        *,
        store: MemoryResultStore | None = None,
        url: str = "memory://",
    ) -> None:
        self.options = options if options is not None else MemoryResultBackendOptions()
        self.default_ttl = self.options.default_ttl
        self.url = url
        self._store = store if store is not None else MemoryResultStore()
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str = "memory://", *, store: MemoryResultStore | None = None, **options: Any
    ) -> MemoryResultBackend:
        """Build a backend from ``memory://`` or ``cache+memory://``.

        Args:
            url: the URL; its query string may carry options.
            store: share this store (see the module docstring); a new one when omitted.
            **options: option overrides (see :class:`MemoryResultBackendOptions`).

        Raises:
            InvalidURL: not a memory URL.
            ConfigurationError: unknown option or bad value.
        """
        parsed = parse_url(url)
        if parsed.scheme not in _SCHEMES:
            raise InvalidURL(
                f"{mask_url(url)!r} is not a memory result backend URL: "
                "use 'memory://' or 'cache+memory://'"
            )
        opts = build_options(
            MemoryResultBackendOptions, parsed.query, options, owner="memory result backend"
        )
        return cls(opts, store=store, url=url)

    @property
    def memory_store(self) -> MemoryResultStore:
        """The store this client reads and writes; pass it as ``store=`` to share it."""
        return self._store

    # ---- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{describe(self)} is closed")

    def _effective_ttl(self, ttl: float | None) -> float | None:
        _check_seconds(ttl, "ttl")
        effective = self._ttl(ttl)
        return None if effective is None or math.isinf(effective) else effective

    # ---- ResultBackend
    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Save ``record``; a stored SUCCESS is kept and the call is a no-op.

        Non-blocking apart from the store's lock. Wakes ``wait`` callers for this id when the
        state is ready.

        Raises:
            ConfigurationError: a refused task id (see ``validate_task_id``), unknown state,
                negative or NaN ``ttl``.
            EncodeError: the record cannot be encoded with ``serializer``.
            ConnectionLost: this client is closed.
        """
        self._check_open()
        record = self._check_record(record)
        try:
            state = State(record.state)
        except ValueError:
            raise ConfigurationError(f"unknown task state {record.state!r}") from None
        if state is not record.state:
            record = dataclasses.replace(record, state=state)
        effective = self._effective_ttl(ttl)
        default_serializers.encode(meta_from_record(record), self.options.serializer)
        self._store.store(_isolated(record), effective)

    def fetch(self, task_id: str) -> ResultRecord | None:
        """Return the record for ``task_id``, or ``None`` if unknown or expired. Non-blocking."""
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        record = self._store.fetch_many((task_id,)).get(task_id)
        return None if record is None else _isolated(record)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Return the live records among ``task_ids`` in one lock acquisition."""
        self._check_open()
        found = self._store.fetch_many(self._check_ids(task_ids))
        return {task_id: _isolated(record) for task_id, record in found.items()}

    def forget(self, task_id: str) -> None:
        """Delete the record for ``task_id``. Idempotent."""
        self._check_open()
        self._store.forget(self._check_id(task_id, "task id"))

    def close(self) -> None:
        """Mark this client closed and wake its waiters. Idempotent; the store stays intact."""
        if self._closed:
            return
        self._closed = True
        self._store.wake_all()

    # ---- wait
    def wait(self, task_id: str, timeout: float) -> ResultRecord | None:
        """Block until ``task_id`` is ready or ``timeout`` seconds pass (push, no polling).

        Returns the ready record, else the latest non-ready record or ``None``.

        Raises:
            ConfigurationError: negative or NaN ``timeout``.
            ConnectionLost: this client is (or gets) closed.
        """
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        _check_seconds(timeout, "timeout")
        record = self._store.wait(task_id, float(timeout), lambda: self._closed)
        return None if record is None else _isolated(record)

    # ---- counters
    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to counter ``key`` (missing: 0); refresh its ttl.

        Raises:
            ConfigurationError: ``amount`` not an int, ``key`` empty or holding a set.
        """
        self._check_open()
        key = self._check_id(key, "counter key")
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigurationError(f"amount must be an int, got {amount!r}")
        return self._store.incr(key, amount, self._effective_ttl(ttl))

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """Atomically add ``member`` to set ``key``; return its size. Idempotent per member.

        Raises:
            ConfigurationError: ``key`` or ``member`` refused (the id rules), ``key`` holding
                a counter.
        """
        self._check_open()
        key = self._check_id(key, "counter key")
        member = self._check_id(member, "member")
        return self._store.add_member(key, member, self._effective_ttl(ttl))

    def forget_key(self, key: str) -> None:
        """Delete counter or set ``key``. Idempotent."""
        self._check_open()
        self._store.forget_key(self._check_id(key, "counter key"))

    # ---- groups
    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Save the membership of ``record.group_id`` (replacing any previous one)."""
        self._check_open()
        record = self._check_group(record)
        self._store.store_group(record, self._effective_ttl(ttl))

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """Return the group or ``None`` if unknown or expired."""
        self._check_open()
        return self._store.fetch_group(self._check_id(group_id, "group id"))

    def forget_group(self, group_id: str) -> None:
        """Delete the group record (not its members' results). Idempotent."""
        self._check_open()
        self._store.forget_group(self._check_id(group_id, "group id"))

    # ---- expiry sweep
    def purge_expired(self, *, batch_size: int = 1000) -> int:
        """Delete every expired entry of the store (results, groups, counters).

        Holds the lock for at most ``batch_size`` entries at a time. Returns how many entries
        were deleted; entries already removed by reads or by the cleanup on writes are not
        counted again.

        Raises:
            ConfigurationError: ``batch_size`` < 1.
        """
        self._check_open()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
        return self._store.purge_expired(batch_size)

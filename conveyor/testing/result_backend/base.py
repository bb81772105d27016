"""The result backend suite's base: the knobs, the fixtures (see
:mod:`conveyor.testing.result_backend`), the records the tests store and the helpers every
topic uses.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest

from conveyor.core.capabilities import Capability
from conveyor.core.types import READY_STATES, ResultRecord, State
from conveyor.testing.processes import ChildProcess, ProcessRecipe
from conveyor.testing.support import (
    REQUIRES_ATTR,
    eventually,
    missing_capabilities,
    suite_process_recipe,
    suite_spawner,
)

MakeResultBackend = Callable[..., Any]
#: ``spawn(**options) -> ChildProcess``: a client built in another process.
SpawnResultBackend = Callable[..., ChildProcess]

_UTC = timezone.utc
_DATE_DONE = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=_UTC)
_DATE_TOLERANCE = timedelta(milliseconds=1)
_LONG_TTL = 300.0
_THREADS = 8
_NO_RECIPE = (
    "no result_backend_process_recipe fixture, and type(backend).from_url(backend.url) "
    "cannot be built in another process (no url, no from_url, or a class defined in a "
    "function): override result_backend_process_recipe"
)


def skip_reason(test: Any, declared: frozenset[Capability]) -> str | None:
    """The skip reason for ``test`` given the ``declared`` capabilities, or None to run it."""
    missing = missing_capabilities(test, declared)
    if not missing:
        return None
    return ", ".join(f"needs capability '{c.value}'" for c in missing)


def _caps(backend: Any) -> frozenset[Capability]:
    # The instance's set: an instance may declare less than its class (SQLite :memory: is
    # neither durable nor cross-process).
    caps: frozenset[Capability] = getattr(backend, "capabilities", frozenset())
    return caps


def _canon(value: Any) -> str:
    """JSON text for comparisons that tell ``True`` from ``1`` and ``1.0`` from ``1``."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _exc(exc_type: str, *args: Any, module: str = "builtins") -> dict[str, Any]:
    return {"exc_type": exc_type, "exc_message": list(args), "exc_module": module}


def _record(
    task_id: str, state: State = State.SUCCESS, result: Any = 42, **kw: Any
) -> ResultRecord:
    if "date_done" not in kw:
        kw["date_done"] = _DATE_DONE if state in READY_STATES else None
    return ResultRecord(task_id=task_id, state=state, result=result, **kw)


def _assert_same_time(got: datetime | None, want: datetime | None, what: str) -> None:
    if want is None:
        assert got is None, f"{what}: expected None, got {got!r}"
        return
    assert isinstance(got, datetime), f"{what}: expected a datetime, got {got!r}"
    assert got.tzinfo is not None, f"{what}: naive datetime {got!r}; must be aware UTC"
    assert got.utcoffset() == timedelta(0), f"{what}: {got!r} is not UTC"
    assert abs(got - want) <= _DATE_TOLERANCE, f"{what}: {got!r} != {want!r} (within 1 ms)"


def _assert_same_record(got: Any, want: ResultRecord) -> None:
    assert got is not None, f"record {want.task_id!r} not found"
    assert isinstance(got, ResultRecord), f"fetch returned {type(got).__name__}, not ResultRecord"
    assert got.task_id == want.task_id
    assert isinstance(got.state, State), f"state {got.state!r} is not a State member"
    assert got.state is want.state
    assert _canon(got.result) == _canon(want.result)
    assert got.traceback == want.traceback
    _assert_same_time(got.date_done, want.date_done, "date_done")
    assert _canon(got.children or []) == _canon(want.children or [])
    assert got.group_id == want.group_id
    assert got.parent_id == want.parent_id
    assert _canon(dict(got.extended)) == _canon(dict(want.extended))


class ResultBackendSuite:
    """What the topics of :class:`~conveyor.testing.result_backend.ResultBackendConformance`
    share."""

    short_ttl: ClassVar[float] = 1.0
    expiry_tolerance: ClassVar[float] = 1.0
    expiry_timeout: ClassVar[float] = 5.0
    process_timeout: ClassVar[float] = 60.0

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture
    def make_result_backend(self) -> MakeResultBackend:
        """Override: return ``make(**options)`` building a new client on one shared store."""
        pytest.fail(
            f"{type(self).__name__} must define a `make_result_backend` fixture returning "
            "make(**options) -> ResultBackend (a new client on the same store per call)"
        )

    @pytest.fixture
    def new_result_backend(
        self, make_result_backend: MakeResultBackend
    ) -> Iterator[MakeResultBackend]:
        """``make_result_backend`` wrapped so that every client made is closed at teardown."""
        made: list[Any] = []

        def new(**options: Any) -> Any:
            backend = make_result_backend(**options)
            made.append(backend)
            return backend

        yield new
        errors: list[BaseException] = []
        for backend in reversed(made):
            try:
                backend.close()
            except Exception as exc:  # close the others, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    @pytest.fixture
    def result_backend(self, new_result_backend: MakeResultBackend) -> Any:
        """A client built with no options."""
        return new_result_backend()

    @pytest.fixture
    def result_backend_process_recipe(self, result_backend: Any) -> ProcessRecipe:
        """Override: how another process builds a client on the same store (module doc)."""
        return suite_process_recipe(result_backend, _NO_RECIPE)

    @pytest.fixture
    def spawn_result_backend(
        self, result_backend_process_recipe: ProcessRecipe
    ) -> Iterator[SpawnResultBackend]:
        """``spawn(**options)``: a client in a new process, killed after the test."""
        with suite_spawner(
            result_backend_process_recipe, timeout=self.process_timeout, what="result backend"
        ) as spawn:
            yield spawn

    @pytest.fixture(autouse=True)
    def _skip_without_capabilities(self, request: pytest.FixtureRequest) -> None:
        if not getattr(request.function, REQUIRES_ATTR, ()):
            return
        backend = request.getfixturevalue("result_backend")
        reason = skip_reason(request.function, _caps(backend))
        if reason is not None:
            pytest.skip(reason)

    # ------------------------------------------------------------------ helpers
    def _sweep_only(self, backend: Any) -> bool:
        caps = _caps(backend)
        return Capability.EXPIRY_SWEEP in caps and Capability.NATIVE_TTL not in caps

    def _sweep_if_needed(self, backend: Any) -> None:
        if self._sweep_only(backend):
            backend.purge_expired()

    def _wait_until(self, deadline: float) -> None:
        """Bounded wait for the monotonic clock to pass ``deadline``."""
        eventually(
            lambda: time.monotonic() >= deadline,
            timeout=max(0.0, deadline - time.monotonic()) + 5.0,
            max_interval=0.05,
            message="clock deadline",
        )

    def _past_expiry(self, stored_at: float, ttl: float | None = None) -> None:
        """Wait until an entry written before ``stored_at`` with ``ttl`` must be gone."""
        self._wait_until(stored_at + (ttl or self.short_ttl) + self.expiry_tolerance)

    def _eventually_gone(self, backend: Any, check: Callable[[], bool], what: str) -> None:
        def gone() -> bool:
            self._sweep_if_needed(backend)
            return check()

        eventually(
            gone,
            timeout=self.short_ttl + self.expiry_tolerance + self.expiry_timeout,
            message=f"{what} expired",
        )

    @staticmethod
    def _run_threads(target: Callable[[int], None]) -> None:
        errors: list[BaseException] = []
        barrier = threading.Barrier(_THREADS)

        def run(n: int) -> None:
            try:
                barrier.wait(10.0)
                target(n)
            except BaseException as exc:  # re-raised below in the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(n,), name=f"conformance-{n}", daemon=True)
            for n in range(_THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60.0)
        assert not any(t.is_alive() for t in threads), "worker threads did not finish in 60 s"
        if errors:
            raise errors[0]

"""Time limits: which apply to a message, and how they are raised inside a running task.

Which: the message's own (``apply_async(time_limit=..., soft_time_limit=...)``, Celery's
``timelimit`` header ``[hard, soft]``), else the task's options, else the app's
``task_time_limit`` / ``task_soft_time_limit`` read when the task runs. Zero, negative,
NaN, infinite and absurd (over ~3 years) values are no limit.

How, by where the task runs:

* a process's main thread (prefork children, a solo worker in the main thread): SIGALRM
  raises ``SoftTimeLimitExceeded`` (and, in solo, ``TimeLimitExceeded`` at the hard limit);
  a blocking call such as ``time.sleep`` is interrupted. The prefork parent enforces the
  hard limit itself by killing the child.
* any other thread (the threads pool): :class:`ThreadTimeLimits` raises them with
  ``PyThreadState_SetAsyncExc``, at the thread's next Python instruction: a call blocked in
  C code sees it only when it returns. A thread cannot be killed, so a task that catches
  ``TimeLimitExceeded`` keeps its slot; the worker says so once at start.
"""

from __future__ import annotations

import heapq
import signal
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from conveyor.core.types import Envelope
from conveyor.runtime.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

if TYPE_CHECKING:
    from conveyor.runtime.app import App
    from conveyor.runtime.task import Task

__all__ = [
    "HARD_LIMIT_WARNING",
    "NO_LIMITS_HINT",
    "Limits",
    "ThreadTimeLimits",
    "async_exceptions_supported",
    "configured_limits",
    "hard_limit",
    "limit_seconds",
    "time_limits",
]

#: Limits above this many seconds (about three years) are no limit at all: a timer that
#: long overflows ``setitimer`` and cannot matter.
_MAX_LIMIT = 1e8

#: Said once by a solo or threads worker when a hard limit is configured (``%s``: the pool).
HARD_LIMIT_WARNING = (
    "the %s pool cannot kill a task at its hard time limit (task_time_limit, time_limit=): "
    "TimeLimitExceeded is raised inside the task instead (in a thread: at its next Python "
    "instruction, so a call blocked in C code sees it only when it returns); a task that "
    "catches it keeps its slot until it returns. The prefork pool kills the task's process"
)
NO_LIMITS_HINT = "time limits are not enforced in task threads; use the prefork pool"


def limit_seconds(value: Any) -> float | None:
    """A usable limit in seconds, or None (unset, zero, negative, NaN, infinite, absurd)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not (0.0 < seconds <= _MAX_LIMIT):  # also False for NaN
        return None
    return seconds


def time_limits(timelimit: Any, task: Task) -> tuple[float | None, float | None]:
    """``(hard, soft)`` seconds for one message: its own ``timelimit`` where set, else the
    task's options, else the app's settings, read now."""
    given = timelimit if isinstance(timelimit, (list, tuple)) and len(timelimit) == 2 else ()
    hard = limit_seconds(given[0]) if given else None
    soft = limit_seconds(given[1]) if given else None
    if hard is None:
        hard = limit_seconds(task.time_limit)
    if soft is None:
        soft = limit_seconds(task.soft_time_limit)
    return hard, soft


def hard_limit(envelope: Envelope, task: Task) -> float | None:
    """The hard limit of a message from its headers alone (the prefork parent enforces it
    without decoding the body; a protocol v1 message carries none in its headers)."""
    headers = envelope.headers
    given = headers.get("timelimit") if isinstance(headers, Mapping) else None
    return time_limits(given, task)[0]


def configured_limits(app: App) -> tuple[bool, bool]:
    """``(any hard limit, any limit)`` among ``app``'s tasks and settings."""
    conf = app.conf
    pairs = [time_limits(None, task) for task in app.tasks.values()]
    pairs.append((limit_seconds(conf.task_time_limit), limit_seconds(conf.task_soft_time_limit)))
    return (
        any(hard is not None for hard, _ in pairs),
        any(hard is not None or soft is not None for hard, soft in pairs),
    )


def _deadlines(hard: float | None, soft: float | None) -> list[tuple[float, type[BaseException]]]:
    """Seconds from now and what to raise then; a soft limit at or after the hard one is
    never reached."""
    out: list[tuple[float, type[BaseException]]] = []
    if soft is not None and (hard is None or soft < hard):
        out.append((soft, SoftTimeLimitExceeded))
    if hard is not None:
        out.append((hard, TimeLimitExceeded))
    return out


def async_exceptions_supported() -> bool:
    """Whether this interpreter can raise an exception in another thread (CPython can)."""
    try:
        import ctypes

        return hasattr(ctypes, "pythonapi") and hasattr(
            ctypes.pythonapi, "PyThreadState_SetAsyncExc"
        )
    except ImportError:  # pragma: no cover - a Python without ctypes
        return False


class _Armed:
    """One task's clock in a :class:`ThreadTimeLimits`.

    ``gate`` is a re-entrant lock: the timer raises only while it can take it without
    waiting; the task's thread takes it when the task ends and never gives it back.
    """

    __slots__ = ("c_ident", "done", "gate")

    def __init__(self, c_ident: Any) -> None:
        self.c_ident = c_ident
        self.gate = threading.RLock()
        self.done = False


class ThreadTimeLimits:
    """Raises ``SoftTimeLimitExceeded`` / ``TimeLimitExceeded`` in the thread running a task
    when its limits pass (one daemon thread per worker, every deadline in one heap).

    Nothing is ever raised in a thread after its task ended, although an asynchronous
    exception can land at any instruction of the target thread, including inside a
    ``with lock:`` that it would then never release. So the task's thread takes no lock
    the timer could be raising into: at the task's end it takes the task's ``gate`` (an
    RLock the timer only tries, without waiting, around each raise) and keeps it, then
    clears an exception raised but not yet delivered. An exception delivered during that
    lands in :func:`conveyor.runtime.execution.execute`, which releases at every layer
    (at most two exceptions per task: the soft one and the hard one).
    """

    def __init__(self) -> None:
        import ctypes

        self._set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
        self._py_object = ctypes.py_object
        self._c_ulong = ctypes.c_ulong
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Armed, Any]] = []
        self._seq = 0
        self._live = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def clock(self) -> _Armed:
        """A clock for the calling thread's next task, not running yet (:meth:`arm`)."""
        return _Armed(self._c_ulong(threading.get_ident()))

    def arm(self, armed: _Armed, hard: float | None, soft: float | None) -> None:
        """Start ``armed`` (from :meth:`clock`, kept by the caller before this call: a limit
        may be raised before this returns)."""
        now = time.monotonic()
        with self._cond:
            self._live += 1
            for seconds, exc in _deadlines(hard, soft):
                self._seq += 1
                entry = (now + seconds, self._seq, armed, self._py_object(exc))
                heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-time-limits", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def disarm(self, armed: _Armed) -> None:
        """The task ended: nothing more is raised in its thread. Call from that thread."""
        armed.gate.acquire()  # waits out a raise in progress; no raise can start after
        self._set_async_exc(armed.c_ident, None)  # NULL: drop one raised, not yet delivered
        if armed.done:
            return
        with self._cond:  # safe now: nothing can be raised into this thread any more
            if not armed.done:
                armed.done = True
                self._live -= 1
                if len(self._heap) > 2 * self._live + 64:  # drop ended tasks' deadlines
                    self._heap = [e for e in self._heap if not e[2].done]
                    heapq.heapify(self._heap)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                when, _, armed, exc = self._heap[0]
                if armed.done:
                    heapq.heappop(self._heap)
                    continue
                wait = when - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if armed.gate.acquire(blocking=False):  # else: the task has ended
                    try:
                        self._set_async_exc(armed.c_ident, exc)
                    finally:
                        armed.gate.release()


class _Alarm:
    """The limits by SIGALRM, in a process's main thread (prefork children, solo)."""

    def __init__(self, deadlines: list[tuple[float, type[BaseException]]], hard: float | None):
        self.deadlines = deadlines
        self.hard = hard
        self.started = 0.0
        self.previous: Any = None

    def arm(self) -> None:
        self.previous = signal.getsignal(signal.SIGALRM)
        signal.signal(signal.SIGALRM, self._fire)
        self.started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, self.deadlines[0][0])

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        previous = self.previous if self.previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGALRM, previous)

    def _fire(self, signum: int, frame: Any) -> None:
        if not self.deadlines:
            return  # a late signal after the hard limit: nothing more to raise
        _, exc = self.deadlines.pop(0)
        if exc is TimeLimitExceeded:
            self.deadlines.clear()
            raise TimeLimitExceeded(self.hard)
        if self.deadlines:
            left = self.deadlines[0][0] - (time.monotonic() - self.started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
        raise exc()


class Limits:
    """Enforces ``(hard, soft)`` on the code run between :meth:`start` and :meth:`release`,
    in the calling thread: SIGALRM in a main thread, ``timer`` elsewhere (None: not at all).

    :meth:`release` is idempotent; :func:`conveyor.runtime.execution.execute` calls it at
    every exit layer, so a limit delivered while one layer releases is caught by the next.
    """

    def __init__(self, timer: ThreadTimeLimits | None) -> None:
        self.timer = timer
        self.alarm: _Alarm | None = None
        self.armed: _Armed | None = None

    def start(self, hard: float | None, soft: float | None) -> None:
        deadlines = _deadlines(hard, soft)
        if not deadlines:
            return
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            self.alarm = _Alarm(deadlines, hard)
            self.alarm.arm()
        elif self.timer is not None:
            self.armed = self.timer.clock()  # kept before it runs: release() must see it
            self.timer.arm(self.armed, hard, soft)

    def release(self) -> None:
        if self.alarm is not None:
            self.alarm.disarm()
            self.alarm = None
        if self.timer is not None and self.armed is not None:
            self.timer.disarm(self.armed)

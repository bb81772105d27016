"""The worker: consume queues, run tasks in a pool, store results, then settle deliveries.

Delivery rules (at-least-once by default):

* A delivery is acked only after its result is stored (``task_acks_late=True``, the
  default; set it False, or ``acks_late=False`` on a task, to ack before running).
* A heartbeat renews the lease of every delivery a live slot runs or will run, so a long
  task is not handed to another worker while this one lives; if it dies, leases lapse.
* ETA messages that arrive early are published back with the remaining delay and acked;
  expired ones are marked REVOKED without decoding the body.

Failures are classified; nothing loops and one message never stops the worker or a slot:

* Transient (``OperationalError``): storing a computed result is retried while the
  delivery stays held (:mod:`conveyor.runtime.storing`), so the task does not run again;
  anywhere else the delivery is given back and the consumer backs off.
* Anything else is recorded once: a FAILURE naming the real error (a minimal one when the
  full record cannot be stored), then the delivery is acked or dead-lettered.
* Refused messages (too large, unsigned or badly signed, undecodable, a disallowed content
  type) are dead-lettered with a log line and write no result under the id they claim.
  Unknown tasks and messages delivered more than ``worker_max_deliveries`` times (counted
  here for crashes where the broker cannot count) get a FAILURE and are dead-lettered.

Pools: ``solo`` (the consumer thread runs tasks), ``threads``, and ``prefork``
(:mod:`conveyor.runtime.prefork`). Time limits, per message (else the task's, else the
settings'): see :func:`conveyor.runtime.execution.execute`; only prefork can kill a task.

Modules: this one holds the lifecycle (start, signals, shutdown), the consumer loop, the
slots, heartbeat and sweeper; :mod:`conveyor.runtime.delivery` handles one delivery
(pre-checks, running, settling); :mod:`conveyor.runtime.ratelimit` holds the rate limiter.

Shutdown: the first SIGTERM/SIGINT is warm (stop consuming, finish running tasks, give the
rest back to the broker); a second one is cold (give everything back now and exit).
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from conveyor.core.capabilities import Capability
from conveyor.core.compression import normalize_accept_compression
from conveyor.core.errors import (
    ConveyorError,
    InvalidReceipt,
    OperationalError,
)
from conveyor.core.protocols import ExpirySweep, LeaseExtension
from conveyor.core.signing import signer_from_config
from conveyor.core.types import Delivery
from conveyor.core.urls import mask_url
from conveyor.runtime.delivery import DeliveryHandling, Runner, run_in_child
from conveyor.runtime.execution import describe
from conveyor.runtime.prefork import Child
from conveyor.runtime.ratelimit import RateLimiter, parse_rate
from conveyor.runtime.storing import ResultWriter, StoreGaveUp, show
from conveyor.runtime.timelimits import (
    NO_LIMITS_HINT,
    ThreadTimeLimits,
    async_exceptions_supported,
    configured_limits,
)

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["POOLS", "Worker", "parse_rate"]

log = logging.getLogger("conveyor.worker")

POOLS = ("prefork", "threads", "solo")


class Worker(DeliveryHandling):
    """Consumes ``queues`` and runs the app's tasks.

    Args:
        app: the application whose tasks run.
        queues: queue names (default: ``task_default_queue``).
        concurrency: tasks run at once (default ``worker_concurrency`` or the CPU count;
            always 1 for ``solo``).
        pool: ``prefork``, ``threads`` or ``solo``.
        prefetch_multiplier: deliveries held per slot (``worker_prefetch_multiplier``).
        hostname: node name for logs and results (``conveyor@<host>``).
        receive_timeout: seconds one ``receive`` call may block.

    Thread-safety: ``start()`` blocks the calling thread; ``stop()`` may be called from any
    thread or a signal handler.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        pool: str | None = None,
        prefetch_multiplier: int | None = None,
        hostname: str | None = None,
        receive_timeout: float = 1.0,
    ) -> None:
        conf = app.conf
        self.app = app
        self.queues = list(queues or [conf.task_default_queue])
        self.pool = pool or conf.worker_pool
        if self.pool not in POOLS:
            raise ConveyorError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")
        if self.pool == "solo":
            self.concurrency = 1
        else:
            self.concurrency = int(concurrency or conf.worker_concurrency or os.cpu_count() or 1)
        multiplier = prefetch_multiplier or conf.worker_prefetch_multiplier
        self.prefetch_limit = max(1, self.concurrency * int(multiplier))
        self.hostname = hostname or f"conveyor@{socket.gethostname()}"
        self.receive_timeout = float(receive_timeout)
        self.lease_seconds = float(conf.worker_lease_seconds)
        self.max_deliveries = int(conf.worker_max_deliveries)
        self.max_message_size = int(conf.worker_max_message_size)
        self.shutdown_timeout = float(conf.worker_shutdown_timeout)
        accept = conf.accept_content
        self.accept = tuple([accept] if isinstance(accept, str) else accept)
        # Normalized once here: every decode checks a compressed body against this set and
        # stops decompressing at max_message_size (a bomb never inflates past it).
        self.accept_compression = normalize_accept_compression(conf.accept_compression)
        self.result_ttl = conf.result_expires
        # security_key set: refuse unsigned or badly signed deliveries before decoding them.
        self.signer = signer_from_config(conf.security_key)
        self.stats: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._held: dict[int, Delivery] = {}
        self._ready: collections.deque[Delivery] = collections.deque()
        # id(delivery) -> the thread handling it: the heartbeat renews only live ones' leases
        self._running: dict[int, threading.Thread] = {}
        self._stopping = threading.Event()
        self._cold = threading.Event()
        # set when running tasks are no longer waited for: stores retrying give up
        self._abandon = threading.Event()
        self._started = threading.Event()
        self._threads: list[threading.Thread] = []
        self._slots: list[threading.Thread] = []
        self._children: list[Child] = []
        self._limiters: dict[str, RateLimiter | None] = {}
        self._timer = ThreadTimeLimits() if self.pool != "prefork" else None
        self._hard_limit_warned = False
        self._crashes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._transient_streak = 0
        self._pause_until = 0.0
        self.results = ResultWriter(app, self.hostname, self._abandon, self.stats)

    # ---- lifecycle
    def banner(self) -> str:
        """Startup text: node, URLs (passwords masked), queues, pool, tasks."""
        app = self.app
        default = " (embedded default: single machine only)" if app.uses_embedded_default else ""
        lines = [
            f"conveyor worker {self.hostname}",
            f"  broker:      {mask_url(app.broker_url)}{default}",
            f"  results:     {mask_url(app.result_backend_url)}",
            f"  queues:      {', '.join(self.queues)}",
            f"  pool:        {self.pool} x {self.concurrency} (prefetch {self.prefetch_limit})",
            f"  tasks:       {', '.join(sorted(app.tasks)) or '(none registered)'}",
        ]
        return "\n".join(lines)

    def start(self) -> None:
        """Run until :meth:`stop` (or a signal, when called from the main thread)."""
        self.app.import_modules()
        broker = self.app.broker
        self._check_capabilities(broker)
        self._check_time_limits()
        in_main = threading.current_thread() is threading.main_thread()
        previous = self._install_signals() if in_main else {}
        try:
            if not self._declare_queues(broker):
                return  # stopped while waiting for the broker
            self._spawn_threads()
            self._started.set()
            log.info("ready: consuming %s", ", ".join(self.queues))
            self._consume_loop()
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _declare_queues(self, broker: Any) -> bool:
        """Declare the queues; while the broker is unreachable, log and retry with backoff
        (``broker_connection_retry_on_startup``, at most ``broker_connection_max_retries``
        times; None: for ever) so that a worker started before its broker, or during an
        outage, waits instead of exiting. False: stopped meanwhile.

        Raises:
            OperationalError: still unreachable after the retries (or retrying is off).
            ConfigurationError: refused credentials and the like are never retried.
        """
        conf = self.app.conf
        retry = bool(conf.broker_connection_retry_on_startup)
        limit = conf.broker_connection_max_retries
        attempt, backoff = 0, 0.5
        while not self._stopping.is_set():
            try:
                for queue in self.queues:
                    broker.declare_queue(queue)
                if attempt:
                    log.warning("broker reachable again after %d retries", attempt)
                return True
            except OperationalError as exc:
                attempt += 1
                if not retry or (limit is not None and attempt > int(limit)):
                    raise
                of = f" of {int(limit)}" if limit is not None else ""
                log.error(
                    "cannot reach the broker (%s); retry %d%s in %.1fs",
                    describe(exc),
                    attempt,
                    of,
                    backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        return False

    def stop(self, *, cold: bool = False) -> None:
        """Ask the worker to stop: warm (finish running tasks) or cold (give them back)."""
        if cold:
            self._cold.set()
            self._abandon.set()
        elif not self._stopping.is_set():  # a result waiting for its store waits this long
            self.results.abandon_at = time.monotonic() + self.shutdown_timeout
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def wait_started(self, timeout: float = 10.0) -> bool:
        """Block until the worker consumes (for tests and embedding)."""
        return self._started.wait(timeout)

    def _check_capabilities(self, broker: Any) -> None:
        caps: frozenset[Capability] = getattr(broker, "capabilities", frozenset())
        if Capability.AT_LEAST_ONCE not in caps:
            log.warning(
                "broker %s does not declare at_least_once: a crash can lose tasks",
                type(broker).__name__,
            )
        if Capability.LEASE_EXTENSION not in caps:
            log.warning(
                "broker %s cannot extend leases: tasks running longer than its lease may be "
                "delivered again",
                type(broker).__name__,
            )

    def _check_time_limits(self) -> None:
        """Say once, at start, what this pool does with the time limits configured."""
        if self.pool == "prefork":
            return
        any_hard, any_limit = configured_limits(self.app)
        if any_hard:
            self._warn_hard_limit()
        if any_limit and not async_exceptions_supported():
            log.warning("this Python cannot raise exceptions in threads: %s", NO_LIMITS_HINT)

    def _install_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: Any) -> None:
            if self._stopping.is_set():
                log.warning("second signal: cold shutdown, giving back held tasks")
                self.stop(cold=True)
            else:
                log.warning("signal %d: warm shutdown (again for cold)", signum)
                self.stop()

        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, on_signal)
        return previous

    def _spawn_threads(self) -> None:
        hb = threading.Thread(target=self._heartbeat_loop, name="conveyor-heartbeat", daemon=True)
        self._threads.append(hb)
        if self._sweep_interval() is not None:
            self._threads.append(
                threading.Thread(target=self._sweep_loop, name="conveyor-sweeper", daemon=True)
            )
        runners: list[Runner] = []
        if self.pool == "threads":
            runners = [self._run_here] * self.concurrency
        elif self.pool == "prefork":
            ctx = multiprocessing.get_context("fork")
            for i in range(self.concurrency):
                child = Child(
                    self.app,
                    ctx,
                    i,
                    self.accept,
                    max_size=self.max_message_size,
                    accept_compression=self.accept_compression,
                )
                self._children.append(child)
                runners.append(functools.partial(run_in_child, child))
        for i, runner in enumerate(runners):
            slot = threading.Thread(
                target=self._slot_loop,
                args=(functools.partial(self._process, run=runner),),
                name=f"conveyor-slot-{i}",
                daemon=True,
            )
            self._slots.append(slot)
            self._threads.append(slot)
        for thread in self._threads:
            thread.start()

    # ---- consuming
    def _consume_loop(self) -> None:
        broker = self.app.broker
        backoff = 0.1
        while not self._stopping.is_set():
            pause = self._pause_until - time.monotonic()
            if pause > 0:  # transient failures handling deliveries: do not spin on them
                self._stopping.wait(pause)
                continue
            with self._cond:
                capacity = self.prefetch_limit - len(self._held)
                if capacity <= 0:
                    self._cond.wait(0.5)
                    continue
            try:
                deliveries = broker.receive(
                    self.queues, max_messages=capacity, timeout=self.receive_timeout
                )
                backoff = 0.1
            except Exception as exc:  # transient, or a broker bug: never the worker's end
                if isinstance(exc, OperationalError):
                    log.error("receive failed (%s); retrying in %.1fs", describe(exc), backoff)
                else:
                    log.exception("receive failed unexpectedly; retrying in %.1fs", backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not deliveries:
                continue
            with self._cond:
                for delivery in deliveries:
                    self._held[id(delivery)] = delivery
                    self._ready.append(delivery)
                self._cond.notify_all()
            if self.pool == "solo":
                while not self._stopping.is_set():
                    taken = self._take()
                    if taken is None:
                        break
                    self._run_slot_item(self._process, taken)

    def _take(self) -> Delivery | None:
        """The next waiting delivery, now marked as run by this thread (or None)."""
        with self._cond:
            if not self._ready:
                return None
            delivery = self._ready.popleft()
            self._running[id(delivery)] = threading.current_thread()
            return delivery

    def _slot_loop(self, process: Callable[[Delivery], None]) -> None:
        while True:
            try:
                with self._cond:
                    while not self._ready and not self._stopping.is_set():
                        self._cond.wait(0.5)
                    if self._stopping.is_set():
                        return
                taken = self._take()
                if taken is not None:
                    self._run_slot_item(process, taken)
            except BaseException:
                log.exception("slot error; the slot goes on")
                self._stopping.wait(0.1)

    def _run_slot_item(self, process: Callable[[Delivery], None], delivery: Delivery) -> None:
        try:
            process(delivery)
            if self._transient_streak:
                self._transient_streak = 0
        except OperationalError as exc:
            # A server unreachable while handling the message: it runs again later.
            log.error(
                "transient failure handling message %s (%s); giving it back",
                show(delivery.envelope.id),
                describe(exc),
            )
            self._reject(delivery, requeue=True)
            self._note_transient()
            if isinstance(exc, StoreGaveUp):  # bounded by worker_max_deliveries, like a crash
                self._count_crash(delivery.envelope.id)
        except BaseException as exc:
            log.error(
                "unexpected error handling message %s; dead-lettering it",
                show(delivery.envelope.id),
                exc_info=exc,
            )
            self.stats["dead_lettered"] += 1
            self._reject(delivery, requeue=False, reason=f"worker error: {describe(exc)}")
        finally:
            with self._cond:
                self._running.pop(id(delivery), None)
                self._held.pop(id(delivery), None)
                self._cond.notify_all()

    def _live_held(self) -> list[Delivery]:
        """Held deliveries some live thread is running or will run."""
        with self._cond:
            slots_alive = self.pool == "solo" or any(t.is_alive() for t in self._slots)
            live = []
            for key, delivery in self._held.items():
                thread = self._running.get(key)
                if thread.is_alive() if thread is not None else slots_alive:
                    live.append(delivery)
            return live

    def _heartbeat_loop(self) -> None:
        broker = cast(LeaseExtension, self.app.broker)  # when it declares lease_extension
        if Capability.LEASE_EXTENSION not in getattr(broker, "capabilities", frozenset()):
            return
        interval = max(0.2, self.lease_seconds / 3.0)
        while not self._cold.is_set():
            if self._stopping.is_set() and not self._held:
                return
            for delivery in self._live_held():
                try:
                    broker.extend(delivery, self.lease_seconds)
                except InvalidReceipt:
                    with self._cond:  # settled since the snapshot: not a lost lease
                        still_held = self._held.get(id(delivery)) is delivery
                    if still_held:
                        log.warning(
                            "lease lost for %s; it will be delivered again",
                            show(delivery.envelope.id),
                        )
                except OperationalError as exc:
                    log.warning("lease extension failed (%s); will retry", describe(exc))
                    break
                except Exception:
                    log.exception("lease extension failed unexpectedly; will retry")
                    break
            self._cold.wait(interval)

    def _sweep_interval(self) -> float | None:
        """Seconds between expiry sweeps, or None: only for result backends without native
        expiry (``expiry_sweep`` and not ``native_ttl``: SQL), whose expired rows are
        invisible but stay on disk until deleted."""
        interval = self.app.conf.result_expiry_sweep_interval
        if not interval or float(interval) <= 0:
            return None
        try:
            caps: frozenset[Capability] = getattr(self.app.backend, "capabilities", frozenset())
        except ConveyorError:
            return None  # no usable backend: nothing to sweep
        if Capability.EXPIRY_SWEEP not in caps or Capability.NATIVE_TTL in caps:
            return None
        return float(interval)

    def _sweep_loop(self) -> None:
        """Delete expired results every ``result_expiry_sweep_interval`` seconds (Celery runs
        ``celery.backend_cleanup`` from beat for the same job). The first sweep comes after
        a random part of the interval, so workers started together do not sweep together;
        the sweep itself deletes in short batches and any number of workers may run it."""
        interval = self._sweep_interval()
        assert interval is not None
        wait = interval * random.uniform(0.1, 1.0)
        while not self._stopping.wait(wait):
            wait = interval
            try:
                deleted = cast(ExpirySweep, self.app.backend).purge_expired()
            except ConveyorError as exc:
                log.warning(
                    "expired-result sweep failed (%s); next in %.0fs", describe(exc), interval
                )
                continue
            if deleted:
                log.info("deleted %d expired result rows", deleted)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        with self._cond:
            waiting = list(self._ready)
            self._ready.clear()
        for delivery in waiting:
            self._give_back(delivery)
        if not self._cold.is_set():
            with self._cond:
                while self._running and time.monotonic() < deadline and not self._cold.is_set():
                    self._cond.wait(0.2)
        self._abandon.set()  # stores still retrying give their deliveries back now
        for child in self._children:
            child.stop(kill=self._cold.is_set())
        with self._cond:
            leftovers = list(self._held.values())
        for delivery in leftovers:
            self._give_back(delivery)
        self._cold.set()  # stops the heartbeat
        if self._timer is not None:
            self._timer.close()
        log.info("stopped: %s", dict(self.stats))

    def _give_back(self, delivery: Delivery) -> None:
        self._reject(delivery, requeue=True)
        with self._cond:
            self._held.pop(id(delivery), None)

"""The worker: consume queues, run tasks in a pool, store results, then settle deliveries.

Delivery rules (at-least-once by default):

* A delivery is acked only after its result is stored (``task_acks_late=True``, the
  default; set it False, or ``acks_late=False`` on a task, to ack before running).
* Every delivery the worker holds, running or waiting for a free slot, has its lease renewed
  by a heartbeat thread, so a long task is never handed to another worker while this one
  lives; if the worker dies, the leases lapse and the broker redelivers.
* ETA/countdown messages are held by the broker. A message that arrives early (a Celery
  client publishes ETA tasks immediately) is published back with the remaining delay and
  acked: it never waits in worker memory.
* Expired messages (``expires`` passed) are marked REVOKED without decoding the body.
* Messages that cannot be handled (too large, undecodable, disallowed content type, unknown
  task, delivered more than ``worker_max_deliveries`` times) are dead-lettered with a log
  line and, where the task id is known, a FAILURE result. They never stop the worker.

Pools: ``solo`` (the consumer thread runs tasks), ``threads``, and ``prefork`` (child
processes; soft time limits by SIGALRM in the child, hard limits by killing it).

Shutdown: the first SIGTERM/SIGINT is warm (stop consuming, finish running tasks, give the
rest back to the broker); a second one is cold (give everything back now and exit).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConveyorError,
    DecodeError,
    InvalidReceipt,
    OperationalError,
    SerializationError,
)
from conveyor.core.signing import signer_from_config
from conveyor.core.types import Delivery, Envelope, ResultRecord, State
from conveyor.core.urls import mask_url
from conveyor.runtime.exceptions import (
    NotRegistered,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from conveyor.runtime.execution import Outcome, execute, request_from_headers
from conveyor.runtime.task import Request

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["POOLS", "Worker"]

log = logging.getLogger("conveyor.worker")

POOLS = ("prefork", "threads", "solo")
_STORE_ATTEMPTS = 3


class Worker:
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
        self.result_ttl = conf.result_expires
        # security_key set: refuse unsigned or badly signed deliveries before decoding them.
        self.signer = signer_from_config(conf.security_key)
        self.stats: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._held: dict[int, Delivery] = {}
        self._ready: collections.deque[Delivery] = collections.deque()
        self._running = 0
        self._stopping = threading.Event()
        self._cold = threading.Event()
        self._started = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: list[_Child] = []
        self._limiters: dict[str, _RateLimiter | None] = {}

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
                    "cannot reach the broker (%s); retry %d%s in %.1fs", exc, attempt, of, backoff
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        return False

    def stop(self, *, cold: bool = False) -> None:
        """Ask the worker to stop: warm (finish running tasks) or cold (give them back)."""
        if cold:
            self._cold.set()
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
        if self.pool == "threads":
            for i in range(self.concurrency):
                self._threads.append(
                    threading.Thread(
                        target=self._slot_loop,
                        args=(self._process,),
                        name=f"conveyor-slot-{i}",
                        daemon=True,
                    )
                )
        elif self.pool == "prefork":
            ctx = multiprocessing.get_context("fork")
            for i in range(self.concurrency):
                child = _Child(self, ctx, i)
                self._children.append(child)
                self._threads.append(
                    threading.Thread(
                        target=self._slot_loop,
                        args=(child.process,),
                        name=f"conveyor-slot-{i}",
                        daemon=True,
                    )
                )
        for thread in self._threads:
            thread.start()

    # ---- consuming
    def _consume_loop(self) -> None:
        broker = self.app.broker
        backoff = 0.1
        while not self._stopping.is_set():
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
            except OperationalError as exc:
                log.error("receive failed (%s); retrying in %.1fs", exc, backoff)
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
                    with self._cond:
                        if not self._ready:
                            break
                        delivery = self._ready.popleft()
                    self._run_slot_item(self._process, delivery)

    def _slot_loop(self, process: Callable[[Delivery], None]) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping.is_set():
                    self._cond.wait(0.5)
                if self._stopping.is_set():
                    return
                delivery = self._ready.popleft()
            self._run_slot_item(process, delivery)

    def _run_slot_item(self, process: Callable[[Delivery], None], delivery: Delivery) -> None:
        with self._cond:
            self._running += 1
        try:
            process(delivery)
        except Exception:
            # Anything unexpected (a broker or backend outage while settling): give the
            # message back so it runs again, and keep the worker alive.
            log.exception("failed to handle delivery %s; giving it back", delivery.envelope.id)
            self._safe(lambda: self.app.broker.reject(delivery, requeue=True))
        finally:
            with self._cond:
                self._running -= 1
                self._held.pop(id(delivery), None)
                self._cond.notify_all()

    def _heartbeat_loop(self) -> None:
        broker = self.app.broker
        if Capability.LEASE_EXTENSION not in getattr(broker, "capabilities", frozenset()):
            return
        interval = max(0.2, self.lease_seconds / 3.0)
        while not self._cold.is_set():
            if self._stopping.is_set() and not self._held:
                return
            with self._cond:
                held = list(self._held.values())
            for delivery in held:
                try:
                    broker.extend(delivery, self.lease_seconds)
                except InvalidReceipt:
                    with self._cond:  # settled since the snapshot: not a lost lease
                        still_held = self._held.get(id(delivery)) is delivery
                    if still_held:
                        log.warning(
                            "lease lost for %s; it will be delivered again", delivery.envelope.id
                        )
                except OperationalError as exc:
                    log.warning("lease extension failed (%s); will retry", exc)
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
                deleted = self.app.backend.purge_expired()
            except ConveyorError as exc:
                log.warning("expired-result sweep failed (%s); next in %.0fs", exc, interval)
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
        for child in self._children:
            child.stop(kill=self._cold.is_set())
        with self._cond:
            leftovers = list(self._held.values())
        for delivery in leftovers:
            self._give_back(delivery)
        self._cold.set()  # stops the heartbeat
        log.info("stopped: %s", dict(self.stats))

    def _give_back(self, delivery: Delivery) -> None:
        self._safe(lambda: self.app.broker.reject(delivery, requeue=True))
        with self._cond:
            self._held.pop(id(delivery), None)

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except ConveyorError as exc:
            log.warning("%s", exc)

    # ---- handling one delivery
    def _process(self, delivery: Delivery) -> None:
        """Pre-checks, run in this thread, settle."""
        request = self._precheck(delivery)
        if request is None:
            return
        task = self.app.tasks[request.task]
        self._rate_limit(task.name)
        if not task.acks_late:
            self.app.broker.ack(delivery)
        outcome = execute(self.app, delivery.envelope, request, accept=self.accept)
        self._settle(delivery, request, outcome, acked=not task.acks_late)

    def _rate_limit(self, task_name: str) -> None:
        """Wait for the task's rate limit (Celery's per-worker semantics); the delivery stays
        held under its renewed lease meanwhile."""
        if task_name not in self._limiters:
            per_second = parse_rate(self.app.tasks[task_name].rate_limit)
            # setdefault: two slot threads racing here must share one limiter
            self._limiters.setdefault(task_name, _RateLimiter(per_second) if per_second else None)
        limiter = self._limiters[task_name]
        if limiter is not None:
            limiter.acquire(self._stopping)

    def _precheck(self, delivery: Delivery) -> Request | None:
        """Everything decided from headers alone. Returns None when the delivery is settled."""
        from conveyor.core.celery import peek

        env = delivery.envelope
        request = request_from_headers(env, queue=delivery.queue, redelivered=delivery.redelivered)
        request.hostname = self.hostname
        if len(env.body) > self.max_message_size:
            reason = (
                f"message of {len(env.body)} bytes exceeds worker_max_message_size "
                f"({self.max_message_size})"
            )
            self._dead_letter(delivery, request, reason, DecodeError(reason))
            return None
        if self.signer is not None:
            try:
                self.signer.verify(env)
            except SerializationError as exc:
                self._dead_letter(delivery, request, f"refused: {exc}", exc)
                return None
        try:
            name, task_id, eta, expires = peek(env)
            if name is None:  # protocol v1: the task's fields are in the body
                from conveyor.core.celery import parse_envelope

                message = parse_envelope(env, accept=self.accept)
                name, task_id, eta, expires = message.task, message.id, message.eta, message.expires
        except SerializationError as exc:
            self._dead_letter(delivery, request, f"undecodable message: {exc}", exc)
            return None
        request.task, request.id = name, task_id or request.id
        now = datetime.now(timezone.utc)
        if expires is not None and expires <= now:
            self.stats["revoked"] += 1
            log.info("task %s[%s] expired at %s: revoked", name, request.id, expires.isoformat())
            self._store_exception(request, State.REVOKED, TaskRevokedError("expired"))
            self.app.broker.ack(delivery)
            return None
        broker = self.app.broker
        if eta is not None and (eta - now).total_seconds() > 0.01:
            if Capability.DELAYED_DELIVERY in getattr(broker, "capabilities", frozenset()):
                broker.publish(env, queue=delivery.queue, delay=(eta - now).total_seconds())
                broker.ack(delivery)
                self.stats["deferred"] += 1
                return None
            log.warning(
                "task %s[%s] arrived before its eta; broker cannot delay: running now",
                name,
                request.id,
            )
        if delivery.delivery_count is not None and delivery.delivery_count > self.max_deliveries:
            self._dead_letter(
                delivery,
                request,
                f"delivered {delivery.delivery_count} times (worker_max_deliveries="
                f"{self.max_deliveries}): poison message",
                WorkerLostError(f"delivered {delivery.delivery_count} times without completing"),
            )
            return None
        if name not in self.app.tasks:
            self._dead_letter(delivery, request, f"unknown task {name!r}", NotRegistered(name))
            return None
        return request

    def _settle(
        self, delivery: Delivery, request: Request, outcome: Outcome, *, acked: bool
    ) -> None:
        broker = self.app.broker
        task = self.app.tasks.get(request.task)
        ignore = bool(request.headers.get("ignore_result")) or (
            task is not None and task.ignore_result
        )
        state = outcome.state
        if state == State.SUCCESS.value:
            self.stats["succeeded"] += 1
            log.info("task %s[%s] succeeded in %.4fs", request.task, request.id, outcome.runtime)
            if not ignore:
                self._store(self._record(request, State.SUCCESS, outcome.value))
        elif state == State.RETRY.value:
            self.stats["retried"] += 1
            log.info("task %s[%s] %s", request.task, request.id, outcome.reason)
            self.app.send_task(
                request.task,
                outcome.retry_args,
                outcome.retry_kwargs,
                task_id=request.id,
                countdown=outcome.retry_in,
                retries=request.retries + 1,
                queue=delivery.queue,
                parent_id=request.parent_id,
                root_id=request.root_id,
                group_id=request.group,
                group_index=request.group_index,
                reply_to=request.reply_to,
                priority=delivery.envelope.priority or None,
            )
            if not ignore:
                self._store(self._record(request, State.RETRY, outcome.value, outcome.traceback))
        elif state == State.REJECTED.value:
            self.stats["rejected"] += 1
            log.warning("task %s[%s] rejected: %s", request.task, request.id, outcome.reason)
            if not acked:
                broker.reject(delivery, requeue=outcome.requeue, reason=outcome.reason)
            return
        elif outcome.dead_letter:
            self._dead_letter(
                delivery, request, outcome.reason, stored_value=outcome.value, acked=acked
            )
            return
        elif outcome.worker_lost and not acked:
            # At-least-once: the message runs again (poison protection counts deliveries).
            self.stats["lost"] += 1
            log.error("task %s[%s] %s: giving it back", request.task, request.id, outcome.reason)
            broker.reject(delivery, requeue=True, reason=outcome.reason)
            return
        else:
            self.stats["failed"] += 1
            log.error("task %s[%s] failed: %s", request.task, request.id, outcome.reason)
            if not ignore:
                self._store(self._record(request, State.FAILURE, outcome.value, outcome.traceback))
        if not acked:
            broker.ack(delivery)

    def _dead_letter(
        self,
        delivery: Delivery,
        request: Request,
        reason: str,
        exc: BaseException | None = None,
        *,
        stored_value: Any = None,
        acked: bool = False,
    ) -> None:
        self.stats["dead_lettered"] += 1
        log.error(
            "dead-lettering message %s (task %r, queue %s): %s",
            delivery.envelope.id,
            request.task or "?",
            delivery.queue,
            reason,
        )
        if request.id and (exc is not None or stored_value is not None):
            if stored_value is None and exc is not None:
                from conveyor.core.celery import exception_to_meta

                stored_value = dict(exception_to_meta(exc))
            self._store(self._record(request, State.FAILURE, stored_value, reason))
        if not acked:
            try:
                self.app.broker.reject(delivery, requeue=False, reason=reason)
            except InvalidReceipt:
                # The lease lapsed while we decided (e.g. a slow decode): the message comes
                # back and is dead-lettered again; the delivery counter bounds the loop.
                log.warning("lease lost before dead-lettering %s", delivery.envelope.id)

    def _store_exception(self, request: Request, state: State, exc: BaseException) -> None:
        from conveyor.core.celery import exception_to_meta

        self._store(self._record(request, state, dict(exception_to_meta(exc))))

    def _record(
        self, request: Request, state: State, value: Any, tb: str | None = None
    ) -> ResultRecord:
        extended: dict[str, Any] = {}
        if self.app.conf.result_extended:
            extended = {
                "name": request.task,
                "args": list(request.args),
                "kwargs": request.kwargs,
                "worker": self.hostname,
                "retries": request.retries,
                "queue": request.delivery_info.get("routing_key"),
            }
        if getattr(self.app.backend, "routes_by_reply_to", False):
            # rpc://: the result is a message to the sender's reply queue (celery-wire 3.5);
            # the backend takes these two keys out of the stored meta.
            extended["reply_to"] = request.reply_to or ""
            extended["correlation_id"] = request.correlation_id or request.id
        return ResultRecord(
            task_id=request.id,
            state=state,
            result=value,
            traceback=tb,
            date_done=datetime.now(timezone.utc)
            if state in (State.SUCCESS, State.FAILURE, State.REVOKED)
            else None,
            children=[],
            group_id=request.group,
            parent_id=request.parent_id,
            extended=extended,
        )

    def _store(self, record: ResultRecord) -> None:
        """Store with bounded retries; the caller gives the delivery back if this raises."""
        ttl = self.result_ttl
        ttl_value = 0.0 if ttl is None else float(ttl)
        delay = 0.1
        for attempt in range(_STORE_ATTEMPTS):
            try:
                self.app.backend.store(record, ttl=ttl_value)
                return
            except OperationalError as exc:
                if attempt == _STORE_ATTEMPTS - 1:
                    raise
                log.warning("storing result of %s failed (%s); retrying", record.task_id, exc)
                time.sleep(delay)
                delay *= 4


def parse_rate(rate: str | float | int | None) -> float | None:
    """Tasks per second from Celery's ``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number."""
    if rate is None or rate == "":
        return None
    if isinstance(rate, (int, float)):
        per_second = float(rate)
    else:
        count, _, unit = str(rate).partition("/")
        divisor = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip().lower())
        if divisor is None:
            raise ConveyorError(f"bad rate_limit {rate!r}: use N/s, N/m or N/h")
        per_second = float(count) / divisor
    return per_second if per_second > 0 else None


class _RateLimiter:
    """Spaces starts of one task evenly: at most ``per_second`` starts per second per worker."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, stopping: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            stopping.wait(start - now)


class _Child:
    """One prefork child process and the slot thread's end of its pipe."""

    def __init__(self, worker: Worker, ctx: Any, index: int) -> None:
        self.worker = worker
        self.ctx = ctx
        self.index = index
        self.proc: Any = None
        self.conn: Any = None
        self._spawn()

    def _spawn(self) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        worker = self.worker
        app = worker.app
        accept = worker.accept

        def run() -> None:
            parent_end.close()
            _child_main(app, child_end, accept)

        self.proc = self.ctx.Process(target=run, name=f"conveyor-child-{self.index}", daemon=True)
        self.proc.start()
        child_end.close()
        self.conn = parent_end

    def stop(self, *, kill: bool) -> None:
        with contextlib.suppress(OSError):
            if kill:
                self.proc.kill()
            else:
                self.conn.send(None)
        self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        with contextlib.suppress(OSError):
            self.conn.close()

    def process(self, delivery: Delivery) -> None:
        worker = self.worker
        request = worker._precheck(delivery)
        if request is None:
            return
        task = worker.app.tasks[request.task]
        worker._rate_limit(task.name)
        if not task.acks_late:
            worker.app.broker.ack(delivery)
        outcome = self._run(delivery.envelope, request, task.time_limit)
        worker._settle(delivery, request, outcome, acked=not task.acks_late)

    def _run(self, envelope: Envelope, request: Request, hard_limit: float | None) -> Outcome:
        from conveyor.core.celery import exception_to_meta

        started = time.monotonic()
        try:
            self.conn.send((envelope, request))
        except OSError:
            self._restart()
            return _lost("worker lost: the child process was gone before the task started")
        while True:
            wait = 1.0
            if hard_limit:
                remaining = started + hard_limit - time.monotonic()
                if remaining <= 0:
                    self.proc.kill()
                    self._restart()
                    err = TimeLimitExceeded(f"hard time limit ({hard_limit}s) exceeded")
                    return Outcome(
                        State.FAILURE.value, dict(exception_to_meta(err)), reason=str(err)
                    )
                wait = min(wait, remaining)
            if self.conn.poll(wait):
                try:
                    outcome: Outcome = self.conn.recv()
                    return outcome
                except (EOFError, OSError):
                    break
            if not self.proc.is_alive():
                break
        code = self.proc.exitcode
        self._restart()
        return _lost(f"worker lost: child process exited with code {code} mid-task")

    def _restart(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        self.proc.join(1.0)
        self._spawn()


def _lost(reason: str) -> Outcome:
    from conveyor.core.celery import exception_to_meta

    return Outcome(
        State.FAILURE.value,
        dict(exception_to_meta(WorkerLostError(reason))),
        reason=reason,
        worker_lost=True,
    )


def _child_main(
    app: App, conn: multiprocessing.connection.Connection, accept: tuple[str, ...]
) -> None:
    """Loop of a prefork child: receive (envelope, request), execute, send the outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    app._after_fork()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        envelope, request = job
        outcome = execute(app, envelope, request, accept=accept)
        try:
            conn.send(outcome)
        except OSError:
            return
        except Exception as exc:  # an unpicklable return value fails the task
            from conveyor.core.celery import exception_to_meta

            conn.send(
                Outcome(
                    State.FAILURE.value,
                    dict(exception_to_meta(exc)),
                    reason=f"result cannot be sent back: {exc}",
                )
            )


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the worker process dies (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

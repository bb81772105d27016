"""Handling one delivery: pre-checks, running it, then settling it.

The per-delivery half of :class:`conveyor.runtime.worker.Worker` (which inherits
:class:`DeliveryHandling`); the delivery and failure rules are in that module's docstring.
Here, in order: :meth:`~DeliveryHandling._precheck` (refused, expired, early, poison and
unknown messages are settled without running), the rate limit, execution (in the slot's
thread, or in a prefork child: :func:`run_in_child`), and :meth:`~DeliveryHandling._settle`
(store the result, then ack, give back, reject or dead-letter).

Thread-safety: the methods run on slot threads (several at once); shared state is guarded
by the worker's condition (``_cond``) or is a per-task :class:`RateLimiter`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conveyor.core.capabilities import Capability
from conveyor.core.errors import InvalidReceipt, OperationalError
from conveyor.core.signing import Signer
from conveyor.core.types import Delivery, State
from conveyor.runtime.exceptions import NotRegistered, TaskRevokedError, WorkerLostError
from conveyor.runtime.execution import (
    Outcome,
    describe,
    execute,
    failure,
    inspect_envelope,
    request_from_headers,
)
from conveyor.runtime.prefork import Child
from conveyor.runtime.ratelimit import RateLimiter, parse_rate
from conveyor.runtime.storing import ResultWriter, StoreGaveUp, show
from conveyor.runtime.task import Request, Task
from conveyor.runtime.timelimits import HARD_LIMIT_WARNING, ThreadTimeLimits, hard_limit

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["DeliveryHandling", "Runner", "run_in_child"]

# The worker's logger: one name for everything a worker logs.
log = logging.getLogger("conveyor.worker")

#: Longest pause of the consumer after transient failures handling deliveries.
_PAUSE_MAX = 10.0
#: Task ids whose process crashed here, remembered to bound crash loops on brokers that do
#: not count deliveries (oldest forgotten first).
_CRASHES_KEPT = 10_000

Runner = Callable[[Delivery, Request, Task], Outcome]


class DeliveryHandling:
    """Pre-check, run and settle one delivery; mixed into the worker, which sets every
    attribute declared here in its ``__init__``."""

    app: App
    pool: str
    hostname: str
    accept: tuple[str, ...]
    accept_compression: frozenset[str]
    max_message_size: int
    max_deliveries: int
    signer: Signer | None
    stats: collections.Counter[str]
    results: ResultWriter
    _cond: threading.Condition
    _stopping: threading.Event
    _timer: ThreadTimeLimits | None
    _hard_limit_warned: bool
    _limiters: dict[str, RateLimiter | None]
    _crashes: collections.OrderedDict[str, int]
    _transient_streak: int
    _pause_until: float

    def _warn_hard_limit(self) -> None:
        """Say once that this pool cannot enforce hard time limits."""
        if not self._hard_limit_warned:
            self._hard_limit_warned = True
            log.warning(HARD_LIMIT_WARNING, self.pool)

    def _note_transient(self) -> None:
        """Pause the consumer, doubling up to ``_PAUSE_MAX`` while failures go on."""
        self._transient_streak += 1
        pause = min(0.1 * 2 ** min(self._transient_streak - 1, 10), _PAUSE_MAX)
        self._pause_until = time.monotonic() + pause

    # ---- settling primitives: they never raise, except OperationalError from ack
    def _ack(self, delivery: Delivery) -> bool:
        """Ack; False when the lease was lost meanwhile (the message comes back).

        Raises:
            OperationalError: the broker is unreachable (the caller gives the message back).
        """
        try:
            self.app.broker.ack(delivery)
            return True
        except OperationalError:
            raise
        except InvalidReceipt:
            log.warning(
                "lease of %s lost before its ack: it will be delivered again",
                show(delivery.envelope.id),
            )
        except Exception:
            log.exception("ack of %s failed", show(delivery.envelope.id))
        return False

    def _reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Give back (``requeue``) or dead-letter; logs instead of raising."""
        what = "give back" if requeue else "dead-letter"
        try:
            self.app.broker.reject(delivery, requeue=requeue, reason=reason)
        except InvalidReceipt:
            # The lease lapsed meanwhile: the message comes back (and, if it must be
            # dead-lettered, is again; the delivery count bounds that).
            log.warning("lease of %s lost before the %s", show(delivery.envelope.id), what)
        except OperationalError as exc:
            log.error(
                "could not %s message %s (%s): it will be delivered again",
                what,
                show(delivery.envelope.id),
                describe(exc),
            )
            self._note_transient()
        except Exception:
            log.exception("could not %s message %s", what, show(delivery.envelope.id))
            if not requeue:
                # The broker cannot keep it aside: it would come back and fail the same way
                # for ever. Drop it (said loudly) instead of looping.
                log.error("acking message %s instead: it is dropped", show(delivery.envelope.id))
                try:
                    self.app.broker.ack(delivery)
                except Exception as exc:
                    log.error(
                        "ack of %s failed too (%s)", show(delivery.envelope.id), describe(exc)
                    )

    # ---- handling one delivery
    def _process(self, delivery: Delivery, run: Runner | None = None) -> None:
        """Pre-checks, run (in this thread, or as ``run`` says), settle.

        Raises:
            OperationalError: a server was unreachable; the caller gives the message back.
        """
        request = self._precheck(delivery)
        if request is None:
            return
        task = self.app.tasks[request.task]
        acked = not task.acks_late
        try:
            self._rate_limit(task.name)
            if acked and not self._ack(delivery):
                return  # the lease lapsed first: the message comes back and runs then
            outcome = (run or self._run_here)(delivery, request, task)
        except OperationalError:
            raise
        except BaseException as exc:
            outcome = failure(exc, f"error while running the task: {describe(exc)}")
        self._settle(delivery, request, outcome, acked=acked)

    def _run_here(self, delivery: Delivery, request: Request, task: Task) -> Outcome:
        outcome = execute(
            self.app,
            delivery.envelope,
            request,
            accept=self.accept,
            max_size=self.max_message_size,
            accept_compression=self.accept_compression,
            timer=self._timer,
        )
        if request.timelimit[0] is not None and not self._hard_limit_warned:
            self._warn_hard_limit()  # a per-message limit, unknown at start
        return outcome

    def _rate_limit(self, task_name: str) -> None:
        """Wait for the task's rate limit (Celery's per-worker semantics); the delivery stays
        held under its renewed lease meanwhile."""
        if task_name not in self._limiters:
            per_second = parse_rate(self.app.tasks[task_name].rate_limit)
            # setdefault: two slot threads racing here must share one limiter
            self._limiters.setdefault(task_name, RateLimiter(per_second) if per_second else None)
        limiter = self._limiters[task_name]
        if limiter is not None:
            limiter.acquire(self._stopping)

    def _precheck(self, delivery: Delivery) -> Request | None:
        """Everything decided before running. Returns None when the delivery is settled.

        Raises:
            OperationalError: a server was unreachable; the caller gives the message back.
        """
        env = delivery.envelope
        try:
            request = request_from_headers(
                env, queue=delivery.queue, redelivered=delivery.redelivered
            )
        except Exception:  # headers that are not a map: refused below, by _inspect
            request = Request(id="", task="", delivery_info={"routing_key": delivery.queue})
        request.hostname = self.hostname
        peeked = inspect_envelope(
            env,
            max_size=self.max_message_size,
            signer=self.signer,
            accept=self.accept,
            accept_compression=self.accept_compression,
        )
        if isinstance(peeked, str):
            # No result: the id a refused message claims may not be its sender's to write.
            self._dead_letter(delivery, request, peeked)
            return None
        name, task_id, expired_at, delay = peeked
        request.task, request.id = name, task_id
        if expired_at is not None:
            self.stats["revoked"] += 1
            log.info("task %s[%s] expired at %s: revoked", show(name), show(task_id), expired_at)
            self.results.store(
                self.results.exception(request, State.REVOKED, TaskRevokedError("expired"))
            )
            self._ack(delivery)
            return None
        broker = self.app.broker
        if delay is not None and delay > 0.01:
            if Capability.DELAYED_DELIVERY in getattr(broker, "capabilities", frozenset()):
                try:
                    broker.publish(env, queue=delivery.queue, delay=delay)
                except OperationalError:
                    raise
                except Exception as exc:  # an eta this broker cannot hold: never loops
                    self._dead_letter(
                        delivery, request, f"cannot defer until its eta: {describe(exc)}", exc
                    )
                    return None
                self._ack(delivery)
                self.stats["deferred"] += 1
                return None
            log.warning(
                "task %s[%s] arrived before its eta; broker cannot delay: running now",
                show(name),
                show(task_id),
            )
        count = delivery.delivery_count
        if count is None:  # the broker does not count: the crashes seen here do
            crashes = self._crashes.get(env.id, 0)
            count = crashes + 1 if crashes else None
        if count is not None and count > self.max_deliveries:
            self._dead_letter(
                delivery,
                request,
                f"delivered {count} times (worker_max_deliveries="
                f"{self.max_deliveries}): poison message",
                WorkerLostError(f"delivered {count} times without completing"),
            )
            return None
        if name not in self.app.tasks:
            self._dead_letter(delivery, request, f"unknown task {show(name)}", NotRegistered(name))
            return None
        return request

    def _settle(
        self, delivery: Delivery, request: Request, outcome: Outcome, *, acked: bool
    ) -> None:
        """Store what the outcome says and settle the delivery.

        Raises:
            OperationalError: a server was unreachable; the caller gives the message back.
        """
        task = self.app.tasks.get(request.task)
        ignore = bool(request.headers.get("ignore_result")) or (
            task is not None and task.ignore_result
        )
        state = outcome.state
        if state == State.RETRY.value:
            try:
                self._publish_retry(delivery, request, outcome)
            except OperationalError:
                raise  # given back: it runs again, the retry it asked for
            except Exception as exc:  # a retry this broker cannot take: fail, naming why
                outcome = failure(exc, f"its retry cannot be sent: {describe(exc)}")
                state = outcome.state
            else:
                self.stats["retried"] += 1
                log.info("task %s[%s] %s", show(request.task), show(request.id), outcome.reason)
                if not ignore:
                    self.results.store(
                        self.results.record(request, State.RETRY, outcome.value, outcome.traceback)
                    )
        if state == State.SUCCESS.value:
            self.stats["succeeded"] += 1
            log.info(
                "task %s[%s] succeeded in %.4fs",
                show(request.task),
                show(request.id),
                outcome.runtime,
            )
            if not ignore:
                self.results.store(self.results.record(request, State.SUCCESS, outcome.value))
        elif state == State.REJECTED.value:
            self.stats["rejected"] += 1
            log.warning(
                "task %s[%s] rejected: %s", show(request.task), show(request.id), outcome.reason
            )
            if not acked:
                self._reject(delivery, requeue=outcome.requeue, reason=outcome.reason[:1000])
            return
        elif outcome.dead_letter:
            self._dead_letter(
                delivery, request, outcome.reason, stored_value=outcome.value, acked=acked
            )
            return
        elif outcome.worker_lost and not acked:
            self.stats["lost"] += 1
            crashes = self._count_crash(delivery.envelope.id)
            log.error(
                "task %s[%s] %s (%d time(s) here): giving it back",
                show(request.task),
                show(request.id),
                outcome.reason,
                crashes,
            )
            # At-least-once: it runs again; worker_max_deliveries bounds the crashes.
            self._reject(delivery, requeue=True, reason=outcome.reason)
            return
        elif state != State.RETRY.value:
            self.stats["failed"] += 1
            log.error(
                "task %s[%s] failed: %s", show(request.task), show(request.id), outcome.reason
            )
            if not ignore:
                self.results.store(
                    self.results.record(request, State.FAILURE, outcome.value, outcome.traceback)
                )
        if not acked:
            self._ack(delivery)

    def _publish_retry(self, delivery: Delivery, request: Request, outcome: Outcome) -> None:
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

    def _count_crash(self, key: str) -> int:
        with self._cond:
            count = self._crashes.pop(key, 0) + 1
            self._crashes[key] = count
            while len(self._crashes) > _CRASHES_KEPT:
                self._crashes.popitem(last=False)
            return count

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
        """Log, store a FAILURE when ``exc`` or ``stored_value`` is given (never for a
        refused message), and dead-letter. Never raises, except OperationalError when the
        worker stops while the backend is unreachable (the message is then given back)."""
        self.stats["dead_lettered"] += 1
        reason = reason if len(reason) <= 1000 else reason[:997] + "..."
        log.error(
            "dead-lettering message %s (task %s, queue %s): %s",
            show(delivery.envelope.id),
            show(request.task or "?"),
            delivery.queue,
            reason,
        )
        if request.id and (exc is not None or stored_value is not None):
            if stored_value is None and exc is not None:
                stored_value = failure(exc, reason).value
            try:
                record = self.results.record(request, State.FAILURE, stored_value, reason)
                self.results.store(record)
            except StoreGaveUp as gave_up:  # dead-letter it all the same: never a loop
                log.error("%s; dead-lettering it without a result", describe(gave_up))
        if not acked:
            self._reject(delivery, requeue=False, reason=reason)


def run_in_child(child: Child, delivery: Delivery, request: Request, task: Task) -> Outcome:
    return child.run(delivery.envelope, request, hard_limit(delivery.envelope, task))

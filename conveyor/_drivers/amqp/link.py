"""The AMQP I/O link: one pika connection, its channels and the one thread that drives them.

:class:`AMQPLink` is what the AMQP broker (:mod:`conveyor.transports.amqp`) and the
``rpc://`` result backend (:mod:`conveyor.backends.rpc`) each own: pika connections are not
thread-safe, so every call from any thread is marshalled to the I/O thread. Admin operations
are generators of :func:`rpc` and :func:`fire` steps (:data:`Op`); publishing with confirms is
:class:`~conveyor._drivers.amqp.publisher.Publisher`'s. Importing this module makes pika's
field-table decoder total (:func:`~conveyor._drivers.amqp.fields.fix_pika_decoding`),
process-wide: every AMQP connection of conveyor is built here. Private plumbing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import ssl
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection

from conveyor.core.errors import ConfigurationError, ConnectionLost, ConveyorError, OperationTimeout

from .errors import LinkDown, said, translate_error
from .fields import fix_pika_decoding
from .options import AMQPConnectionOptions, AMQPEndpoint, connection_parameters, redact_url
from .publisher import PubEntry, Publisher, _PubBatch

__all__ = ["AMQPLink", "Op", "PubEntry", "Rpc", "fire", "rpc"]

# The logger of the AMQP broker module since before the link moved here: logging set-ups
# that name it keep working.
log = logging.getLogger("conveyor.transports.amqp")

T = TypeVar("T")

_CHANNELS = ("pub", "adm", "con")
_RETRY_LOG_INTERVAL = 30.0  # seconds between warnings while reconnect attempts keep failing

fix_pika_decoding()


class _QuietProbes(logging.Filter):
    """Drop pika's warning for a 404 on an admin channel of ours.

    Passive declares that find nothing (does this delay level exist? how big is a queue that
    was never declared?) close the channel with 404 by design; the link handles that and
    reopens the channel. Every other pika message passes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3 and args[0] == 404:
            try:
                return args[2] not in self.channels
            except TypeError:  # pragma: no cover - an unhashable argument
                return True
        return True


_quiet_probes = _QuietProbes()
logging.getLogger("pika.channel").addFilter(_quiet_probes)


# ============================================================================== the link


@dataclass(frozen=True, slots=True)
class Rpc:
    """One step of an admin operation: call ``start(channel, callback)`` on channel
    ``channel``; the operation resumes with the reply frame."""

    channel: str
    start: Callable[[Any, Callable[[Any], None]], None]


def rpc(channel: str, method: str, *args: Any, **kwargs: Any) -> Rpc:
    """The step "call ``method(*args, **kwargs, callback=...)`` on channel ``channel``"."""

    def start(ch: Any, callback: Callable[[Any], None]) -> None:
        getattr(ch, method)(*args, callback=callback, **kwargs)

    return Rpc(channel, start)


def fire(channel: str, method: str, *args: Any, **kwargs: Any) -> Rpc:
    """Like :func:`rpc` but with ``nowait`` (no reply is awaited; a failure closes the
    channel, which the next :func:`rpc` step on it reports). Pipelines idempotent steps."""

    def start(ch: Any, callback: Callable[[Any], None]) -> None:
        getattr(ch, method)(*args, **kwargs)
        callback(None)

    return Rpc(channel, start)


Op = Generator[Rpc, Any, T]
"""An admin operation: a generator that yields :class:`Rpc` steps and returns a value.

A channel error during a step is thrown into the generator (translated), so an operation may
catch it (a passive declare that finds nothing) and go on; the channel is reopened first."""


class _Chan:
    __slots__ = ("channel", "epoch", "open")

    def __init__(self) -> None:
        self.channel: Any = None
        self.open = False
        self.epoch = 0


class _OpState:
    __slots__ = ("abandoned", "future", "gen", "pending", "token", "waiting")

    def __init__(self, gen: Op[Any]) -> None:
        self.gen = gen
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.pending: Rpc | None = None
        self.waiting: str | None = None
        self.token = 0
        self.abandoned = False


_IDLE, _CONNECTING, _OPEN, _DOWN, _CLOSED = "idle", "connecting", "open", "down", "closed"


class AMQPLink(Publisher):
    """One AMQP connection, its three channels and the I/O thread that owns them.

    Channels: ``pub`` (publisher confirms), ``adm`` (declarations, purges, passive declares;
    reopened after a channel error) and ``con`` (``basic.qos``/``basic.consume``, acks).
    Every pika object is touched only by the I/O thread; other threads use
    :meth:`call_soon`, :meth:`run`, :meth:`run_op` and :meth:`publish`.

    The owner may set these hooks, all called on the I/O thread:

    * ``on_ready(generation)``: a new connection is open with all channels;
    * ``on_lost()``: the connection is gone (everything tied to it is invalid);
    * ``on_channel_reset(name, old_epoch)``: one channel closed while the connection lives;
    * ``on_consumer_cancelled(tag)``: RabbitMQ cancelled a consumer (queue deleted);
    * ``on_tick()``: every ``tick_interval`` seconds while open.

    Args:
        endpoints: hosts in failover order.
        options: connection options.
        name: used in logs, errors and as the default connection name.
        url: the URL, for messages (masked before use).
    """

    def __init__(
        self,
        endpoints: Sequence[AMQPEndpoint],
        options: AMQPConnectionOptions,
        *,
        name: str,
        url: str = "",
        tick_interval: float | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("an AMQP link needs at least one host")
        self.endpoints = list(endpoints)
        self.options = options
        self.name = name
        self.where = redact_url(url) or ", ".join(str(e) for e in self.endpoints)
        self.tick_interval = tick_interval
        self.on_ready: Callable[[int], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_channel_reset: Callable[[str, int], None] | None = None
        self.on_consumer_cancelled: Callable[[str], None] | None = None
        self.on_tick: Callable[[], None] | None = None
        # Shared state, guarded by _cond.
        self._cond = threading.Condition(threading.Lock())
        self._state = _IDLE
        self._generation = 0
        self._ever_connected = False
        self._round_failed = False
        self._last_error: ConveyorError | None = None
        self._down_since: float | None = None
        self._blocked = False
        self._thread: threading.Thread | None = None
        self._ioloop = IOLoop()
        # I/O-thread state.
        self._conn: Any = None
        self._chans = {name: _Chan() for name in _CHANNELS}
        self._ops: deque[_OpState] = deque()
        self._op: _OpState | None = None
        self._tokens = itertools.count(1)
        self._pub_seq = 0
        self._unconfirmed: OrderedDict[int, tuple[_PubBatch, int]] = OrderedDict()
        self._pub_parked: list[_PubBatch] = []
        self._pub_lock = threading.Lock()
        self._pub_queue: deque[_PubBatch] = deque()
        self._pub_wake = False
        self._backoff = options.retry_interval
        self._last_retry_log = -math.inf
        self._retry_handle: Any = None
        self._tick_handle: Any = None
        self._workflow: Any = None
        self._attempt: object = None
        self._closing = False

    # ------------------------------------------------------------------ caller side
    @property
    def generation(self) -> int:
        """Number of the current connection (1 for the first); changes on reconnect."""
        return self._generation

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def ever_connected(self) -> bool:
        return self._ever_connected

    def down_for(self) -> float:
        """Seconds since the connection was lost (0.0 while open)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def start(self) -> None:
        """Start the I/O thread and the first connection attempt. Idempotent."""
        with self._cond:
            if self._thread is not None or self._state == _CLOSED:
                return
            self._state = _CONNECTING
            thread = threading.Thread(target=self._main, name=f"{self.name}-io", daemon=True)
            self._thread = thread
        thread.start()
        self.call_soon(self._connect)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread soon (thread-safe)."""
        self._ioloop.add_callback_threadsafe(fn)

    def await_open(self, deadline: float, *, fail_fast: bool = True) -> int:
        """Block until the connection is open; return its generation.

        Raises:
            ConnectionLost: closed, or not open by ``deadline``; at once (``fail_fast``) when
                no connection was ever made and the last attempt failed.
            ConfigurationError: that attempt was refused for credentials or vhost.
        """
        self.start()
        with self._cond:
            while True:
                state = self._state
                if state == _CLOSED:
                    raise ConnectionLost(f"{self.name} is closed")
                if state == _OPEN:
                    return self._generation
                if fail_fast and not self._ever_connected and self._round_failed:
                    raise self._failure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(waited=True)
                self._cond.wait(remaining)

    def _failure(self, *, waited: bool = False) -> ConveyorError:
        last = self._last_error
        if isinstance(last, ConfigurationError):
            return last
        if waited and self._ever_connected:
            detail = f" (connection lost {self.down_for():.1f}s ago, reconnecting)"
        elif waited:
            detail = " (still connecting)"
        else:
            detail = ""
        reason = f": {last}" if last is not None else ""
        return ConnectionLost(f"cannot reach RabbitMQ at {self.where}{detail}{reason}")

    def run(self, fn: Callable[[], T], deadline: float) -> T:
        """Run ``fn`` on the I/O thread and return its result (or raise its error)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        if self._state == _CLOSED:
            raise ConnectionLost(f"{self.name} is closed")
        self.call_soon(call)
        return self._wait(future, deadline)

    def run_op(self, op: Op[T], deadline: float) -> T:
        """Run an admin operation (see :data:`Op`) once the connection is open.

        Raises:
            LinkDown: the connection dropped while it ran (the caller may retry).
            OperationTimeout: not done by ``deadline`` (it may still complete).
        """
        state = _OpState(op)

        def enqueue() -> None:
            if self._state != _OPEN:
                state.future.set_exception(LinkDown(self._down_error()))
                return
            self._ops.append(state)
            self._kick_ops()

        self.call_soon(enqueue)
        try:
            result: T = self._wait(state.future, deadline)
        except OperationTimeout:
            state.abandoned = True
            raise
        return result

    def run_op_retrying(self, make_op: Callable[[], Op[T]], deadline: float) -> T:
        """:meth:`run_op` for idempotent operations: after a reconnect, run it again."""
        while True:
            self.await_open(deadline)
            try:
                return self.run_op(make_op(), deadline)
            except LinkDown:
                if time.monotonic() >= deadline:
                    raise self._failure(waited=True) from None

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop the I/O thread. Idempotent."""
        with self._cond:
            if self._state == _CLOSED:
                return
            self._state = _CLOSED
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._ioloop.close()
            return
        self.call_soon(self._io_close)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _wait(self, future: concurrent.futures.Future[T], deadline: float) -> T:
        remaining = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, remaining))
        except concurrent.futures.TimeoutError:
            future.cancel()
            if self._state == _CLOSED:
                raise ConnectionLost(f"{self.name} is closed") from None
            raise OperationTimeout(
                f"RabbitMQ at {self.where} did not answer within "
                f"{self.options.operation_timeout:g}s"
            ) from None

    # ------------------------------------------------------------------ I/O thread: lifecycle
    def _main(self) -> None:
        try:
            while True:
                try:
                    self._ioloop.start()
                    break  # stopped on purpose (_io_close)
                except Exception:
                    if self._closing:
                        raise
                    # pika raises out of its own callbacks now and then, e.g. ValueError
                    # "Expected connected socket, but getpeername() failed" when a peer
                    # accepts the TCP connection and drops it at once (a proxy refusing,
                    # a server going down). Letting that end this thread closed the broker
                    # for good and left a worker running with nothing to consume: treat it
                    # as a failed connection instead and go on reconnecting.
                    log.exception("%s: error inside the I/O loop; reconnecting", self.name)
                    self._recover()
        except Exception:  # pragma: no cover - a failure while closing; keep it visible
            log.exception("%s: I/O loop crashed", self.name)
        finally:
            with self._cond:
                self._state = _CLOSED
                self._cond.notify_all()
            self._fail_everything(ConnectionLost(f"{self.name} is closed"))
            self._ioloop.close()

    def _recover(self) -> None:
        """I/O thread, loop stopped by an exception: drop what was in flight and schedule a
        reconnect (with the usual backoff) unless one is scheduled already."""
        workflow, self._workflow = self._workflow, None
        self._attempt = None  # whatever that attempt still reports is ignored
        if workflow is not None:
            with contextlib.suppress(Exception):  # already finished: nothing to abort
                workflow.abort()
        conn = self._conn
        if conn is not None and not conn.is_closed:

            def close() -> None:
                # Closing reports through _on_connection_closed, which reconnects.
                if conn.is_closed or conn.is_closing:
                    return
                try:
                    conn.close()
                except Exception as exc:  # broken beyond closing: report it closed ourselves
                    self._on_connection_closed(conn, exc)

            self._ioloop.add_callback_threadsafe(close)
            return
        if self._retry_handle is None and self._workflow is None:
            self._on_connect_done(ConnectionLost(f"connecting to {self.where} failed"))

    def _set_state(self, state: str) -> None:
        with self._cond:
            if self._state != _CLOSED:
                self._state = state
            self._cond.notify_all()

    def _down_error(self) -> ConveyorError:
        if self._state == _CLOSED:
            return ConnectionLost(f"{self.name} is closed")
        return self._last_error or ConnectionLost(f"not connected to RabbitMQ at {self.where}")

    def _connect(self) -> None:
        self._retry_handle = None
        if self._closing or self._state == _CLOSED:
            return
        if self._workflow is not None:
            return  # an attempt is under way already
        with self._cond:
            self._state = _CONNECTING
            self._round_failed = False
            self._cond.notify_all()
        try:
            params = [
                connection_parameters(e, self.options, name=self.name) for e in self.endpoints
            ]
            token = object()  # which attempt a report belongs to (see _recover)
            self._attempt = token
            self._workflow = SelectConnection.create_connection(
                params,
                lambda result: self._on_connect_done(result, attempt=token),
                custom_ioloop=self._ioloop,
            )
        except (OSError, ValueError, ssl.SSLError) as exc:  # bad TLS files and the like
            self._on_connect_done(exc)

    def _on_connect_done(self, result: Any, *, attempt: object = None) -> None:
        if attempt is not None and attempt is not self._attempt:
            # The report of an attempt _recover abandoned: never a second connection.
            if not isinstance(result, BaseException):
                with contextlib.suppress(Exception):
                    result.close()
            return
        self._workflow = None
        if isinstance(result, BaseException):
            error = translate_error(result, what=f"connecting to {self.where}")
            with self._cond:
                self._last_error = error
                self._round_failed = True
                if self._state != _CLOSED:
                    self._state = _DOWN
                    if self._down_since is None and self._ever_connected:
                        self._down_since = time.monotonic()
                self._cond.notify_all()
            if self._closing:
                return
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self.options.max_retry_interval)
            now = time.monotonic()
            if now - self._last_retry_log >= _RETRY_LOG_INTERVAL:
                self._last_retry_log = now
                log.warning("%s: %s; retrying in %.1fs", self.name, error, delay)
            else:
                log.debug("%s: %s; retrying in %.1fs", self.name, error, delay)
            self._retry_handle = self._ioloop.call_later(delay, self._connect)
            return
        conn = result
        if self._closing:
            conn.close()
            return
        self._conn = conn
        conn.add_on_close_callback(self._on_connection_closed)
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        for name in _CHANNELS:
            self._open_channel(name)

    def _open_channel(self, name: str) -> None:
        conn = self._conn
        if conn is None or not conn.is_open or self._closing:
            return
        try:
            conn.channel(on_open_callback=lambda ch: self._on_channel_open(name, ch))
        except pika.exceptions.AMQPError as exc:  # connection closing: the close callback follows
            log.debug("%s: cannot open channel %s: %s", self.name, name, said(exc))

    def _on_channel_open(self, name: str, channel: Any) -> None:
        if self._conn is None or self._closing:
            return
        chan = self._chans[name]
        chan.channel = channel
        channel.add_on_close_callback(lambda ch, reason: self._on_channel_closed(name, ch, reason))
        if name == "con":
            channel.add_on_cancel_callback(self._on_cancel)
        if name == "adm":
            _quiet_probes.channels.add(channel)
        if name == "pub":
            self._pub_seq = 0
            channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._ready(name))
        else:
            self._ready(name)

    def _ready(self, name: str) -> None:
        chan = self._chans[name]
        if chan.channel is None:
            return
        chan.open = True
        chan.epoch += 1
        if self._state == _CONNECTING:
            if all(c.open for c in self._chans.values()):
                with self._cond:
                    self._generation += 1
                    self._ever_connected = True
                    self._last_error = None
                    self._down_since = None
                    if self._state != _CLOSED:
                        self._state = _OPEN
                    self._cond.notify_all()
                self._backoff = self.options.retry_interval
                self._last_retry_log = -math.inf
                log.info("%s: connected to %s", self.name, self._conn_desc())
                self._schedule_tick()
                if self.on_ready is not None:
                    self.on_ready(self._generation)
                self._kick_ops()
            return
        # A channel reopened on a live connection.
        if name == "pub":
            parked, self._pub_parked = self._pub_parked, []
            for batch in parked:
                self._io_publish(batch)
        op = self._op
        if op is not None and op.waiting == name:
            self._issue(op)

    def _conn_desc(self) -> str:
        try:
            params = self._conn.params
            return f"{params.host}:{params.port}"
        except AttributeError:  # pragma: no cover
            return self.where

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self._blocked = True
        log.warning("%s: RabbitMQ blocks publishing (resource alarm)", self.name)

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self._blocked = False
        log.info("%s: RabbitMQ accepts publishing again", self.name)

    def _on_channel_closed(self, name: str, channel: Any, reason: BaseException) -> None:
        chan = self._chans[name]
        if chan.channel is not channel:
            return
        chan.channel = None
        was_open = chan.open
        chan.open = False
        conn = self._conn
        if self._closing or conn is None or not conn.is_open:
            return  # the connection-level handler deals with everything
        error = translate_error(reason, what=f"{name} channel")
        if name == "pub":
            self._fail_unconfirmed(LinkDown(error))
        elif name == "con" and was_open:
            log.warning(
                "%s: consume channel closed: %s (deliveries held on it return)", self.name, error
            )
            if self.on_channel_reset is not None:
                self.on_channel_reset(name, chan.epoch)
        op = self._op
        if op is not None and op.pending is not None and op.pending.channel == name:
            op.pending = None
            op.waiting = None
            self._advance(op, None, error)
        self._open_channel(name)

    def _on_cancel(self, frame: Any) -> None:
        tag = frame.method.consumer_tag
        if self.on_consumer_cancelled is not None:
            self.on_consumer_cancelled(tag)

    def _on_connection_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        for chan in self._chans.values():
            chan.channel = None
            chan.open = False
        self._cancel_tick()
        if self._closing:
            self._ioloop.stop()
            return
        error = translate_error(reason, what=f"connection to {self.where}")
        was_open = self._state == _OPEN
        with self._cond:
            self._last_error = error
            if self._state != _CLOSED:
                self._state = _DOWN
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._cond.notify_all()
        self._fail_everything(LinkDown(error))
        if self.on_lost is not None:
            self.on_lost()
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.options.max_retry_interval)
        log.warning(
            "%s: connection %s: %s; reconnecting in %.1fs",
            self.name,
            "lost" if was_open else "failed",
            error,
            delay,
        )
        self._retry_handle = self._ioloop.call_later(delay, self._connect)

    def _fail_everything(self, error: BaseException) -> None:
        self._fail_unconfirmed(error)
        with self._pub_lock:
            queued = list(self._pub_queue)
            self._pub_queue.clear()
        for batch in queued:
            batch.fail(error)
        for batch in self._pub_parked:
            batch.fail(error)
        self._pub_parked = []
        ops = list(self._ops)
        self._ops.clear()
        current, self._op = self._op, None
        if current is not None:
            ops.insert(0, current)
        for op in ops:
            if not op.future.done():
                op.future.set_exception(error)
            op.gen.close()

    def _io_close(self) -> None:
        self._closing = True
        self._cancel_tick()
        if self._retry_handle is not None:
            self._ioloop.remove_timeout(self._retry_handle)
            self._retry_handle = None
        self._fail_everything(ConnectionLost(f"{self.name} is closed"))
        if self._workflow is not None:
            with contextlib.suppress(Exception):  # already finished: nothing to abort
                self._workflow.abort()
        conn = self._conn
        if conn is not None and not conn.is_closed and not conn.is_closing:
            conn.close()
            # Do not wait forever for a server that stopped answering.
            self._ioloop.call_later(2.0, self._ioloop.stop)
        else:
            self._ioloop.stop()

    def _schedule_tick(self) -> None:
        if self.tick_interval is None or self.on_tick is None:
            return
        self._tick_handle = self._ioloop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        if self._state != _OPEN or self._closing:
            return
        try:
            if self.on_tick is not None:
                self.on_tick()
        finally:
            self._schedule_tick()

    def _cancel_tick(self) -> None:
        if self._tick_handle is not None:
            self._ioloop.remove_timeout(self._tick_handle)
            self._tick_handle = None

    # ------------------------------------------------------------------ I/O thread: channels
    def channel(self, name: str) -> Any:
        """The open pika channel ``name``, or None (I/O thread only)."""
        chan = self._chans[name]
        return chan.channel if chan.open else None

    def epoch(self, name: str) -> int:
        """How many times channel ``name`` was opened; receipts compare it (I/O thread)."""
        return self._chans[name].epoch

    def channel_open(self, name: str) -> bool:
        return self._chans[name].open

    # ------------------------------------------------------------------ I/O thread: ops
    def _kick_ops(self) -> None:
        while self._op is None and self._ops and self._state == _OPEN:
            op = self._ops.popleft()
            if op.abandoned or op.future.done():
                op.gen.close()
                continue
            self._op = op
            self._advance(op, None, None)

    def _advance(self, op: _OpState, value: Any, error: BaseException | None) -> None:
        try:
            item = op.gen.throw(error) if error is not None else op.gen.send(value)
        except StopIteration as stop:
            self._finish(op, stop.value, None)
            return
        except BaseException as exc:
            self._finish(op, None, exc)
            return
        op.pending = item
        self._issue(op)

    def _issue(self, op: _OpState) -> None:
        item = op.pending
        if item is None:  # pragma: no cover - defensive
            return
        channel = self.channel(item.channel)
        if channel is None:
            op.waiting = item.channel  # resumed by _ready() once it reopens
            return
        op.waiting = None
        token = op.token = next(self._tokens)

        def reply(frame: Any) -> None:
            if self._op is op and op.token == token and op.pending is item:
                op.pending = None
                self._advance(op, frame, None)

        try:
            item.start(channel, reply)
        except Exception as exc:
            op.pending = None
            self._advance(op, None, translate_error(exc, what=f"{item.channel} channel"))

    def _finish(self, op: _OpState, result: Any, error: BaseException | None) -> None:
        if self._op is op:
            self._op = None
        if not op.future.done():
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)
        self._ioloop.add_callback_threadsafe(self._kick_ops)

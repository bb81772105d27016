"""``conveyor check URL``: connect, run round trips, report capabilities and latency.

The whole check is bounded by ``timeout`` (10 s by default, ``conveyor check --timeout``): a
dead host, a firewall that drops packets, or a server or Sentinel that accepts connections
but never answers ends the check with :class:`~conveyor.core.errors.OperationTimeout`
instead of hanging on the driver's own (often unbounded) socket timeouts. The probe runs in
a daemon thread, so one stuck in a driver call is abandoned, never waited for.

Everything :func:`run_check` raises is a :class:`~conveyor.core.errors.ConveyorError` whose
message went through :func:`~conveyor.core.urls.mask_text` and whose chain is cut: a
driver's error text may quote the URL, a DSN or an option map, and the CLI prints it.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from conveyor.core.errors import (
    ConfigurationError,
    ConveyorError,
    MissingDependency,
    OperationTimeout,
)
from conveyor.core.registry import default_registry
from conveyor.core.types import Envelope, ResultRecord, State
from conveyor.core.urls import mask_text, refuse_ambiguous_credentials

__all__ = ["DEFAULT_TIMEOUT", "percentile", "run_check"]

Row = tuple[str, float, float, float]
Report = tuple[list[Row], set[str], str]

#: Seconds the whole check may take by default (connect, every round trip, close).
DEFAULT_TIMEOUT = 10.0


def _kind_of(url: str, kind: str) -> str:
    if kind != "auto":
        return kind
    try:
        default_registry.lookup("broker", url)
        return "broker"
    except MissingDependency:
        raise
    except ConfigurationError:
        default_registry.lookup("result_backend", url)
        return "backend"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` 0-1); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _row(name: str, samples: list[float]) -> Row:
    ms = [s * 1000.0 for s in samples]
    return (name, statistics.median(ms), percentile(ms, 0.99), max(ms))


def run_check(
    url: str, *, kind: str = "auto", rounds: int = 20, timeout: float | None = DEFAULT_TIMEOUT
) -> Report:
    """Run ``rounds`` round trips against ``url``, all within ``timeout`` seconds.

    ``timeout`` bounds the whole check (building the client, connecting, every round trip);
    ``None`` or ``0`` waits as long as the driver does.

    Returns:
        (rows of (operation, p50 ms, p99 ms, max ms), capability names, "broker"/"result
        backend").

    Raises:
        ConveyorError: the URL is bad, the driver is missing, or the server failed. Its
            message is masked (no password, no secret option) and its cause chain cut, so
            printing it, or its traceback, shows no secret. Any other exception comes back
            as a plain ``ConveyorError`` naming the original type.
        OperationTimeout: no answer within ``timeout`` (a subclass of ``ConveyorError``).
    """
    rounds = max(1, rounds)
    try:
        # Before any store sees it: a driver may read such a URL's secret as a host name.
        refuse_ambiguous_credentials(url)
        probe = _check_broker if _kind_of(url, kind) == "broker" else _check_backend
        return _bounded(probe, url, rounds, timeout)
    except ConveyorError as exc:
        # Same type and attributes (callers match on them); only the text is masked.
        exc.args = (masked_error_text(exc),)
        raise exc from None
    except Exception as exc:
        raise ConveyorError(masked_error_text(exc)) from None


def _bounded(
    probe: Callable[[str, int], Report], url: str, rounds: int, timeout: float | None
) -> Report:
    """``probe(url, rounds)`` in a daemon thread, waited for at most ``timeout`` seconds."""
    if not timeout or timeout <= 0:
        return probe(url, rounds)
    outcome: list[Report] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(probe(url, rounds))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="conveyor-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if failure:
        raise failure[0]
    if outcome:
        return outcome[0]
    raise OperationTimeout(
        f"no answer within {timeout:g}s: the host is down or unreachable, a firewall drops "
        "the packets, or the server (or Sentinel) accepts connections but does not answer. "
        "Give more time with --timeout"
    )


def masked_error_text(exc: BaseException) -> str:
    """``str(exc)`` (with its type when it is not conveyor's) fit to print: masked."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the failure itself
        text = ""
    if not isinstance(exc, ConveyorError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return mask_text(text)


def _check_broker(url: str, rounds: int) -> tuple[list[Row], set[str], str]:
    from conveyor.core.registry import broker_from_url

    broker: Any = broker_from_url(url)
    queue = f"conveyor-check-{uuid.uuid4().hex[:8]}"
    pub: list[float] = []
    rcv: list[float] = []
    ack: list[float] = []
    try:
        broker.declare_queue(queue)
        for i in range(rounds):
            env = Envelope(id=str(uuid.uuid4()), body=b'{"check": %d}' % i)
            t0 = time.perf_counter()
            broker.publish(env, queue=queue)
            t1 = time.perf_counter()
            got = broker.receive(queue, max_messages=1, timeout=5.0)
            t2 = time.perf_counter()
            if not got:
                raise OperationTimeout(f"published message not received within 5s from {queue}")
            broker.ack(got[0])
            t3 = time.perf_counter()
            pub.append(t1 - t0)
            rcv.append(t2 - t1)
            ack.append(t3 - t2)
        broker.purge(queue)
    finally:
        broker.close()
    caps = {c.value for c in broker.capabilities}
    return [_row("publish", pub), _row("receive", rcv), _row("ack", ack)], caps, "broker"


def _check_backend(url: str, rounds: int) -> tuple[list[Row], set[str], str]:
    from conveyor.core.registry import result_backend_from_url

    backend: Any = result_backend_from_url(url)
    store: list[float] = []
    fetch: list[float] = []
    forget: list[float] = []
    try:
        for i in range(rounds):
            task_id = f"conveyor-check-{uuid.uuid4()}"
            record = ResultRecord(task_id=task_id, state=State.SUCCESS, result={"check": i})
            t0 = time.perf_counter()
            backend.store(record, ttl=60.0)
            t1 = time.perf_counter()
            got = backend.fetch(task_id)
            t2 = time.perf_counter()
            if got is None or got.result != {"check": i}:
                raise OperationTimeout(f"stored result {task_id} not read back: {got!r}")
            backend.forget(task_id)
            t3 = time.perf_counter()
            store.append(t1 - t0)
            fetch.append(t2 - t1)
            forget.append(t3 - t2)
    finally:
        backend.close()
    caps = {c.value for c in backend.capabilities}
    rows = [_row("store", store), _row("fetch", fetch), _row("forget", forget)]
    return rows, caps, "result backend"

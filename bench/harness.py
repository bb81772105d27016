"""Side-by-side benchmarks of conveyor and Celery on the same servers (``make bench``,
``conveyor bench URL`` from a checkout).

One *pair* is a broker URL and the result backend URL that goes with it (``redis`` ->
``redis``, ``amqp`` -> ``rpc``, ``sqlite`` -> ``sqlite``, ...). For a pair this module
measures, for conveyor and (when installed) Celery 5, in alternating runs so that background
load hits both alike:

* ``enqueue``: ``delay()`` of a trivial task, one thread (and on Redis/RabbitMQ eight threads
  sharing one app), plus conveyor's batch API ``App.send_many``;
* ``drain``: a pre-filled queue consumed by a worker subprocess (solo pool; without and with
  results; and two solo worker processes), timed from the first message taken to the queue
  being empty (and, with results, the last result present);
* ``round trip``: ``delay(...).get()`` one at a time against a running solo worker, p50/p99;
* ``store``/``fetch``: the result backend's store and fetch of a SUCCESS record.

Every figure is a list of runs (the report shows median, min and max). Every loop is bounded
in count *and* time: a run that hits its time cap reports what it did within the cap. Queues
are unique per run and purged or deleted afterwards; worker subprocesses are always stopped.

Worker subprocesses import this module for their app (``-A bench.harness:conveyor_app`` or
``:celery_app``, with the checkout's root on ``PYTHONPATH``), configured from
``CONVEYOR_BENCH_*`` environment variables; so this module imports nothing heavy at import
time. It lives in the repository's ``bench/`` (not in the installed package): the runtime
holds the runtime only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conveyor.core.urls import mask_text

__all__ = [
    "Figure",
    "Pair",
    "Settings",
    "default_pair",
    "format_table",
    "rss_kib",
    "run_pair",
    "stop_process",
]

TASK_NAME = "bench.add"
_ENV_BROKER = "CONVEYOR_BENCH_BROKER"
_ENV_BACKEND = "CONVEYOR_BENCH_BACKEND"
_ENV_RESULTS = "CONVEYOR_BENCH_RESULTS"
_ENV_POLL = "CONVEYOR_BENCH_CELERY_POLL"
#: Schemes on which conveyor and Celery share the wire format and the queue layout.
_WIRE_SHARED = frozenset({"redis", "rediss", "amqp", "amqps", "pyamqp"})
#: The checkout's root: worker subprocesses import ``bench.harness`` from there, wherever
#: they were started.
ROOT = Path(__file__).resolve().parent.parent


# ============================================================================ data


@dataclass
class Figure:
    """One row of the report: the runs of conveyor and Celery for one metric and backend.

    Attributes:
        metric: what was measured (``enqueue``, ``drain (solo, results)``, ...).
        backend: the pair's name (``redis``, ``amqp``, ...).
        unit: ``msg/s``, ``ms`` or ``MiB``.
        conveyor: conveyor's value per run.
        celery: Celery's value per run (empty when not measured).
        higher_is_better: True for rates, False for latencies and memory.
        note: what the row compares, caveats (capped runs, configuration).
    """

    metric: str
    backend: str
    unit: str
    conveyor: list[float] = field(default_factory=list)
    celery: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""

    @staticmethod
    def stats(values: Sequence[float]) -> tuple[float, float, float] | None:
        """(median, min, max), or None without values."""
        if not values:
            return None
        return statistics.median(values), min(values), max(values)

    @property
    def ratio(self) -> float | None:
        """conveyor's median divided by Celery's (None when either is missing or zero)."""
        mine, theirs = self.stats(self.conveyor), self.stats(self.celery)
        if mine is None or theirs is None or theirs[0] == 0:
            return None
        return mine[0] / theirs[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "backend": self.backend,
            "unit": self.unit,
            "conveyor": self.conveyor,
            "celery": self.celery,
            "higher_is_better": self.higher_is_better,
            "ratio": self.ratio,
            "note": self.note,
        }


@dataclass(frozen=True)
class Pair:
    """A broker and result backend URL for each library (the same servers).

    Attributes:
        name: short name (``redis``, ``amqp``, ``sqlite``, ``postgres``, ``mongodb``).
        broker: conveyor's broker URL.
        backend: conveyor's result backend URL.
        celery_broker: Celery's broker URL (same server; may differ in spelling or database).
        celery_backend: Celery's result backend URL.
        drain_backend: conveyor's store for the "drain with results" runs when ``backend``
            cannot be counted from outside (rpc); Celery uses ``celery_drain_backend``.
        celery_drain_backend: see ``drain_backend``.
        slow: a server whose figures say nothing (SecantusDB): fewer messages.
        threads: also measure eight publishing threads.
    """

    name: str
    broker: str
    backend: str
    celery_broker: str
    celery_backend: str
    drain_backend: str = ""
    celery_drain_backend: str = ""
    slow: bool = False
    threads: bool = False


@dataclass
class Settings:
    """Sizes and caps of one bench run.

    Attributes:
        messages: messages per enqueue and drain run.
        roundtrips: ``delay().get()`` calls per round-trip run.
        records: records per store/fetch run.
        runs: runs per figure (the median of at least 3 is reported).
        cap: seconds one run may take before it stops and reports what it did.
        celery: also measure Celery (needs ``celery`` installed).
        celery_poll: Celery's ``polling_interval`` on SQL/MongoDB (kombu's default is 1 s;
            conveyor's SQL broker backs off from 5 ms to 200 ms).
        log: progress lines go here.
    """

    messages: int = 10_000
    roundtrips: int = 1_000
    records: int = 2_000
    runs: int = 3
    cap: float = 12.0
    celery: bool = True
    celery_poll: float = 0.1
    log: Callable[[str], None] = print

    def scaled(self, pair: Pair) -> Settings:
        """Smaller counts for a server whose speed says nothing (SecantusDB)."""
        if not pair.slow:
            return self
        return Settings(
            messages=min(self.messages, 200),
            roundtrips=min(self.roundtrips, 50),
            records=min(self.records, 100),
            runs=self.runs,
            cap=min(self.cap, 40.0),
            celery=self.celery,
            celery_poll=self.celery_poll,
            log=self.log,
        )


def default_pair(url: str, backend: str | None = None) -> Pair:
    """The pair for a broker URL given on the command line (``conveyor bench URL``)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url.rstrip("/")
        results = backend or f"{base}/11"
        return Pair("redis", url, results, url, results, threads=True)
    if scheme in ("amqp", "pyamqp", "amqps"):
        results = backend or "rpc://"
        drain = "" if backend else "redis://127.0.0.1:6379/11"
        return Pair("amqp", url, results, url, results, drain, drain, threads=True)
    if scheme.startswith(("sqla+", "sqlalchemy+")):
        results = backend or "db+" + url.split("+", 1)[1]
        return Pair(scheme.split("+", 2)[1], url, results, url, results)
    if scheme.startswith("mongodb"):
        return Pair("mongodb", url, backend or url, url, backend or url, slow=True)
    return Pair(scheme, url, backend or url, url, backend or url)


# ============================================================================ the apps


def _add(x: int, y: int) -> int:
    return x + y


def _make_conveyor_app(broker: str, backend: str, *, results: bool = True) -> Any:
    from conveyor.runtime.app import App

    app = App("bench", broker=broker, backend=backend, task_ignore_result=not results)
    app.task(name=TASK_NAME)(_add)
    return app


def _make_celery_app(
    broker: str, backend: str | None, *, results: bool = True, poll: float = 0.1
) -> Any:
    from celery import Celery

    app = Celery("bench", broker=broker, backend=backend or None, set_as_current=False)
    if broker.startswith(("sqla", "mongodb")):
        # kombu polls these every second by default. Its SQLAlchemy transport hands every
        # transport option to create_engine(), so polling_interval cannot go there: set the
        # transports' class default instead (this process and its worker subprocesses only).
        from kombu.transport import mongodb, sqlalchemy

        sqlalchemy.Transport.polling_interval = poll
        mongodb.Transport.polling_interval = poll  # type: ignore[assignment]
    app.conf.update(
        task_ignore_result=not results,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.task(name=TASK_NAME)(_add)
    return app


def __getattr__(name: str) -> Any:
    """``conveyor_app`` / ``celery_app``: the worker subprocess's app, from the environment."""
    if name not in ("conveyor_app", "celery_app"):
        raise AttributeError(name)
    broker = os.environ[_ENV_BROKER]
    backend = os.environ.get(_ENV_BACKEND, "")
    results = os.environ.get(_ENV_RESULTS, "1") == "1"
    if name == "conveyor_app":
        app = _make_conveyor_app(broker, backend, results=results)
    else:
        poll = float(os.environ.get(_ENV_POLL, "0.1"))
        app = _make_celery_app(broker, backend or None, results=results, poll=poll)
    globals()[name] = app
    return app


# ============================================================================ processes


def worker_command(lib: str, queue: str, *, pool: str = "solo", concurrency: int = 1) -> list[str]:
    """The command line of a worker subprocess consuming ``queue``."""
    if lib == "conveyor":
        cmd = [sys.executable, "-m", "conveyor.cli", "-A", "bench.harness:conveyor_app"]
        cmd += ["worker", "-P", pool, "-Q", queue, "-l", "warning"]
        if pool != "solo":
            cmd += ["-c", str(concurrency)]
        return cmd
    cmd = [sys.executable, "-m", "celery", "-A", "bench.harness:celery_app", "worker"]
    cmd += ["-P", pool, "-c", str(concurrency), "-Q", queue, "-l", "warning"]
    return [*cmd, "--without-gossip", "--without-mingle", "--without-heartbeat"]


def start_worker(
    lib: str,
    queue: str,
    broker: str,
    backend: str,
    *,
    results: bool,
    pool: str = "solo",
    concurrency: int = 1,
    celery_poll: float = 0.1,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a worker subprocess (its own session, so it can be stopped as a group)."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), path]) if path else str(ROOT),
            _ENV_BROKER: broker,
            _ENV_BACKEND: backend,
            _ENV_RESULTS: "1" if results else "0",
            _ENV_POLL: str(celery_poll),
        }
    )
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            worker_command(lib, queue, pool=pool, concurrency=concurrency),
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    finally:
        if log_path and not isinstance(out, int):
            out.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (warm shutdown), then SIGKILL the process group after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftover children, if any


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(c) for c in text.split())
    return found


def rss_kib(pid: int, *, children: bool = True) -> int:
    """VmRSS of ``pid`` (and, recursively, its children) in KiB, from /proc."""
    total = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        if children:
            todo.extend(_children(current))
    return total


# ============================================================================ sides


class _Side:
    """What the bench needs from one library: send, size, purge, fetch results."""

    lib = ""

    def __init__(self, broker: str, backend: str, *, poll: float = 0.1) -> None:
        self.broker_url = broker
        self.backend_url = backend
        self.poll = poll
        self.app: Any = None

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def send(self, queue: str, i: int) -> Any:
        raise NotImplementedError

    def send_many(self, queue: str, count: int, countdown: float | None = None) -> list[str]:
        """Publish ``count`` tasks quickly (setup, not measured); return their ids."""
        return [str(self.send(queue, i).id) for i in range(count)]

    def size(self, queue: str) -> int:
        raise NotImplementedError

    def purge(self, queue: str) -> None:
        raise NotImplementedError

    def get(self, result: Any, timeout: float) -> Any:
        return result.get(timeout=timeout)

    def ready(self, task_id: str) -> bool:
        raise NotImplementedError

    def store(self, task_id: str) -> None:
        raise NotImplementedError

    def fetch(self, task_id: str) -> Any:
        raise NotImplementedError


class _Conveyor(_Side):
    lib = "conveyor"

    def open(self) -> None:
        self.app = _make_conveyor_app(self.broker_url, self.backend_url)

    def close(self) -> None:
        if self.app is not None:
            self.app.close()

    def send(self, queue: str, i: int) -> Any:
        return self.app.send_task(TASK_NAME, (i, i), queue=queue)

    def send_many(self, queue: str, count: int, countdown: float | None = None) -> list[str]:
        results = self.app.send_many(
            TASK_NAME, ((i, i) for i in range(count)), queue=queue, countdown=countdown
        )
        return [r.id for r in results]

    def size(self, queue: str) -> int:
        return int(self.app.broker.size(queue))

    def purge(self, queue: str) -> None:
        broker = self.app.broker
        broker.purge(queue)
        delete = getattr(broker, "delete_queue", None)
        if delete is not None:
            with contextlib.suppress(Exception):
                delete(queue)

    def ready(self, task_id: str) -> bool:
        record = self.app.backend.fetch(task_id)
        return record is not None and record.ready

    def store(self, task_id: str) -> None:
        from conveyor.core.types import ResultRecord, State

        record = ResultRecord(
            task_id, State.SUCCESS, 2, date_done=datetime.now(timezone.utc), children=[]
        )
        self.app.backend.store(record, ttl=3600.0)

    def fetch(self, task_id: str) -> Any:
        return self.app.backend.fetch(task_id)


class _Celery(_Side):
    lib = "celery"

    def open(self) -> None:
        self.app = _make_celery_app(self.broker_url, self.backend_url or None, poll=self.poll)
        self._conn = self.app.connection_for_write()
        self._conn.ensure_connection(max_retries=3)

    def close(self) -> None:
        if self.app is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self.app.close()

    def send(self, queue: str, i: int) -> Any:
        return self.app.send_task(TASK_NAME, (i, i), queue=queue)

    def send_many(self, queue: str, count: int, countdown: float | None = None) -> list[str]:
        if self.broker_url.split(":", 1)[0] not in _WIRE_SHARED:
            return super().send_many(queue, count, countdown)
        # Setup only: conveyor writes the same Celery protocol v2 messages in kombu's layout
        # on Redis and RabbitMQ, and fills the queue far faster than a delay() loop.
        filler = _make_conveyor_app(self.broker_url, "memory://")
        try:
            results = filler.send_many(
                TASK_NAME,
                ((i, i) for i in range(count)),
                queue=queue,
                countdown=countdown,
                reply_to=self.app.thread_oid,
            )
            return [r.id for r in results]
        finally:
            filler.close()

    def size(self, queue: str) -> int:
        channel = self._conn.default_channel
        try:
            return int(channel.queue_declare(queue, passive=True).message_count)
        except Exception:  # kombu raises the transport's own "not found"
            self._conn = self._conn.clone()
            return 0

    def purge(self, queue: str) -> None:
        channel = self._conn.default_channel
        with contextlib.suppress(Exception):
            channel.queue_purge(queue)
        with contextlib.suppress(Exception):
            channel.queue_delete(queue)

    def ready(self, task_id: str) -> bool:
        meta = self.app.backend.get_task_meta(task_id, cache=False)
        return meta.get("status") in ("SUCCESS", "FAILURE")

    def store(self, task_id: str) -> None:
        self.app.backend.store_result(task_id, 2, "SUCCESS")

    def fetch(self, task_id: str) -> Any:
        return self.app.backend.get_task_meta(task_id, cache=False)


def _queue_name(lib: str, what: str) -> str:
    return f"bench.{lib}.{what}.{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _side(cls: type[_Side], broker: str, backend: str, poll: float) -> Iterator[_Side]:
    side = cls(broker, backend, poll=poll)
    side.open()
    try:
        yield side
    finally:
        side.close()


# ============================================================================ measurements


def _enqueue(side: _Side, n: int, cap: float, threads: int = 1) -> float:
    """Rate of ``send`` (one ``delay()``) over ``n`` messages (or ``cap`` seconds)."""
    queue = _queue_name(side.lib, "enqueue")
    side.send(queue, -1)  # declares the queue, opens connections
    sent = [0] * threads
    deadline = time.monotonic() + cap

    def loop(slot: int) -> None:
        for i in range(slot, n, threads):
            side.send(queue, i)
            sent[slot] += 1
            if sent[slot] % 100 == 0 and time.monotonic() > deadline:
                return

    try:
        started = time.perf_counter()
        if threads == 1:
            loop(0)
        else:
            pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        return sum(sent) / (time.perf_counter() - started)
    finally:
        side.purge(queue)


def _send_many(side: _Conveyor, n: int) -> float:
    queue = _queue_name(side.lib, "batch")
    side.send(queue, -1)
    try:
        started = time.perf_counter()
        side.send_many(queue, n)
        return n / (time.perf_counter() - started)
    finally:
        side.purge(queue)


def _wait(predicate: Callable[[], bool], until: float, interval: float = 0.01) -> bool:
    while time.monotonic() < until:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _drain(
    side: _Side,
    pair_broker: str,
    backend: str,
    n: int,
    settings: Settings,
    *,
    results: bool,
    processes: int = 1,
) -> float:
    """Fill a queue with ``n`` tasks, start worker(s), time first take -> empty (-> last
    result present)."""
    queue = _queue_name(side.lib, "drain")
    ids = side.send_many(queue, n)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + settings.cap + 30.0
        procs.extend(
            start_worker(
                side.lib,
                queue,
                pair_broker,
                backend,
                results=results,
                celery_poll=settings.celery_poll,
            )
            for _ in range(processes)
        )
        if not _wait(lambda: side.size(queue) < n, deadline, 0.005):
            raise RuntimeError(f"{side.lib} worker took nothing from {queue} in time")
        started = time.perf_counter()
        cap = time.monotonic() + settings.cap
        _wait(lambda: side.size(queue) == 0, cap, 0.005)
        if results:
            _wait(lambda: side.ready(ids[-1]), cap, 0.005)
        elapsed = time.perf_counter() - started
        left = side.size(queue)
        if left:
            settings.log(f"    {side.lib}: capped after {elapsed:.1f}s with {left} left")
        return (n - left) / elapsed
    finally:
        for proc in procs:
            stop_process(proc)
        side.purge(queue)


def _roundtrip(side: _Side, settings: Settings, n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of ``delay().get()`` against a running solo worker."""
    queue = _queue_name(side.lib, "rtt")
    proc = start_worker(
        side.lib,
        queue,
        side.broker_url,
        side.backend_url,
        results=True,
        celery_poll=settings.celery_poll,
    )
    try:
        side.get(side.send(queue, 0), 60.0)  # worker up, connections open
        for i in range(10):
            side.get(side.send(queue, i), 10.0)
        samples: list[float] = []
        deadline = time.monotonic() + settings.cap
        for i in range(n):
            started = time.perf_counter()
            side.get(side.send(queue, i), 10.0)
            samples.append((time.perf_counter() - started) * 1000.0)
            if time.monotonic() > deadline:
                settings.log(f"    {side.lib}: capped after {len(samples)} round trips")
                break
        samples.sort()
        p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
        return statistics.median(samples), p99
    finally:
        stop_process(proc)
        side.purge(queue)


def _store_fetch(side: _Side, n: int, cap: float) -> tuple[float, float]:
    ids = [f"bench-{uuid.uuid4()}" for _ in range(n)]
    side.store(ids[0])
    side.fetch(ids[0])
    deadline = time.monotonic() + cap
    started = time.perf_counter()
    stored = 0
    for task_id in ids:
        side.store(task_id)
        stored += 1
        if stored % 50 == 0 and time.monotonic() > deadline:
            break
    store_rate = stored / (time.perf_counter() - started)
    deadline = time.monotonic() + cap
    started = time.perf_counter()
    fetched = 0
    for task_id in ids[:stored]:
        side.fetch(task_id)
        fetched += 1
        if fetched % 50 == 0 and time.monotonic() > deadline:
            break
    return store_rate, fetched / (time.perf_counter() - started)


def _libs(settings: Settings) -> list[type[_Side]]:
    libs: list[type[_Side]] = [_Conveyor]
    if settings.celery:
        libs.append(_Celery)
    return libs


def run_pair(pair: Pair, settings: Settings) -> list[Figure]:
    """Every figure for one pair; runs alternate conveyor / Celery."""
    s = settings.scaled(pair)
    log = s.log
    rows: dict[str, Figure] = {}

    def row(metric: str, unit: str, higher: bool = True, note: str = "") -> Figure:
        if metric not in rows:
            rows[metric] = Figure(metric, pair.name, unit, higher_is_better=higher, note=note)
        return rows[metric]

    def urls(lib: str) -> tuple[str, str]:
        if lib == "conveyor":
            return pair.broker, pair.backend
        return pair.celery_broker, pair.celery_backend

    def drain_backend(lib: str) -> str:
        if lib == "conveyor":
            return pair.drain_backend or pair.backend
        return pair.celery_drain_backend or pair.celery_backend

    slow = " (SecantusDB: figures meaningless)" if pair.slow else ""
    for run in range(s.runs):
        log(f"  [{pair.name}] run {run + 1}/{s.runs}")
        for cls in _libs(s):
            try:
                lib = cls.lib
                broker, backend = urls(lib)

                def fig_of(f: Figure, lib: str = lib) -> list[float]:
                    return f.conveyor if lib == "conveyor" else f.celery

                # Celery enqueues with no result backend: its fastest path (a Redis result
                # backend would SUBSCRIBE once per sent task).
                with _side(
                    cls, broker, backend if lib == "conveyor" else "", s.celery_poll
                ) as side:
                    rate = _enqueue(side, s.messages, s.cap)
                    fig_of(row("enqueue delay() x1", "msg/s", note=slow)).append(rate)
                    log(f"    {lib} enqueue: {rate:,.0f}/s")
                    if pair.threads:
                        rate = _enqueue(side, s.messages, s.cap, threads=8)
                        fig_of(row("enqueue delay() x8 threads", "msg/s")).append(rate)
                        log(f"    {lib} enqueue x8: {rate:,.0f}/s")
                    if isinstance(side, _Conveyor):
                        rate = _send_many(side, s.messages)
                        row(
                            "enqueue send_many (batch)", "msg/s", note="conveyor only"
                        ).conveyor.append(rate)
                        log(f"    {lib} send_many: {rate:,.0f}/s")
                with _side(cls, broker, drain_backend(lib), s.celery_poll) as side:
                    for metric, results, procs in (
                        ("drain solo, no results", False, 1),
                        ("drain solo, results", True, 1),
                        ("drain 2 solo processes, results", True, 2),
                    ):
                        rate = _drain(
                            side,
                            broker,
                            drain_backend(lib),
                            s.messages,
                            s,
                            results=results,
                            processes=procs,
                        )
                        note = slow
                        if results and pair.drain_backend:
                            note = f"results in {pair.drain_backend.split(':')[0]}"
                        fig_of(row(metric, "msg/s", note=note)).append(rate)
                        log(f"    {lib} {metric}: {rate:,.0f}/s")
                with _side(cls, broker, backend, s.celery_poll) as side:
                    p50, p99 = _roundtrip(side, s, s.roundtrips)
                    back = backend.split(":")[0]
                    fig_of(row("round trip p50", "ms", False, f"-> {back}{slow}")).append(p50)
                    fig_of(row("round trip p99", "ms", False, f"-> {back}{slow}")).append(p99)
                    log(f"    {lib} round trip: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
                    if not backend.startswith("rpc"):
                        store, fetch = _store_fetch(side, s.records, s.cap / 2)
                        fig_of(row("result store", "ops/s", note=slow)).append(store)
                        fig_of(row("result fetch", "ops/s", note=slow)).append(fetch)
                        log(f"    {lib} store {store:,.0f}/s, fetch {fetch:,.0f}/s")
            except Exception as exc:  # one failing library or server must not end the run
                log(f"    {cls.lib}: FAILED {type(exc).__name__}: {mask_text(str(exc))}")
    return list(rows.values())


# ============================================================================ report


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(values: Sequence[float]) -> str:
    st = Figure.stats(values)
    if st is None:
        return "-"
    med, lo, hi = st
    return f"{_fmt(med)} [{_fmt(lo)}-{_fmt(hi)}]"


def format_table(figures: Sequence[Figure]) -> str:
    """A Markdown table: medians with [min-max] and the conveyor / Celery ratio."""
    lines = [
        "| backend | metric | unit | conveyor median [min-max] | Celery median [min-max] "
        "| conveyor / Celery | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        ratio = f.ratio
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        if ratio is not None and not f.higher_is_better:
            shown = f"{ratio:.2f} (1/{1 / ratio:.1f})" if ratio else shown
        lines.append(
            f"| {f.backend} | {f.metric} | {f.unit} | {_cell(f.conveyor)} | {_cell(f.celery)} "
            f"| {shown} | {f.note} |"
        )
    return "\n".join(lines)

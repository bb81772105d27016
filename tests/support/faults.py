"""Tools for the fault tests (tests/faults/): a loopback TCP proxy that cuts, refuses and
delays connections, worker subprocesses started through the CLI, execution markers, private
Redis and PostgreSQL servers that a test may restart, and the figures report.

Everything here talks only to 127.0.0.1 and every loop is bounded in time.

Figures: each fault test calls :func:`record_figures` with what it measured (tasks moved,
kills, restarts, lost, duplicated, ...). The rows go to one JSON file,
``$CONVEYOR_FAULTS_REPORT`` or else ``<tox work dir>/reports/faults.json`` (under tox) or
``.tox/reports/faults.json`` at the repository root; rows are keyed by scenario, so a rerun
replaces its own row and parallel writers (xdist workers, tox envs) are serialised by
``flock``. ``python scripts/reliability-table.py`` turns that file into the table in
docs/reliability.md.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import pwd
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"

__all__ = [
    "FAULTS_DIR",
    "Markers",
    "PrivatePostgres",
    "PrivateRedis",
    "TcpProxy",
    "WorkerProcs",
    "free_port",
    "record_figures",
    "report_path",
    "wait_port",
]


# ================================================================================ ports


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ================================================================================ proxy


class _Pipe:
    """One proxied connection: the client's socket, the server's, and data in flight."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        # Per direction: (due time, bytes) in arrival order; delivered when due.
        self.to_server: collections.deque[tuple[float, bytes]] = collections.deque()
        self.to_client: collections.deque[tuple[float, bytes]] = collections.deque()
        self.closed = False


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (SO_LINGER 0): the peer sees the connection reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """A loopback TCP proxy between clients and one upstream server, with fault switches.

    ``TcpProxy(upstream_port)`` listens on ``127.0.0.1:<free port>`` (``.port``) and forwards
    every accepted connection to ``127.0.0.1:upstream_port``, from one selector thread.

    Faults:
        * :meth:`cut` resets every open connection (both sides) at once;
        * ``refuse = True`` resets each new connection as soon as it is accepted;
        * ``latency = seconds`` delays every chunk, in both directions, by that much
          (order kept);
        * ``stall = True`` stops forwarding (data waits in the proxy) without closing.

    Use as a context manager; :meth:`close` stops the thread and resets everything.
    Thread-safety: the switches and :meth:`cut` may be used from any thread.
    """

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = 0.0
        self.refuse = False
        self.stall = False
        self.accepted = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._pipes: list[_Pipe] = []
        self._cut_requested = False
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}")
        self._thread.daemon = True
        self._thread.start()

    # ---- control
    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url_port(self) -> int:
        return self.port

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for p in self._pipes if not p.closed)

    def cut(self) -> None:
        """Reset every open connection now (new ones are accepted unless ``refuse``)."""
        with self._lock:
            self._cut_requested = True
        self._wake()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(10.0)
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # ---- loop
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                with self._lock:
                    cut, self._cut_requested = self._cut_requested, False
                if cut:
                    self._reset_all(sel)
                timeout = self._deliver_due()
                for key, _ in sel.select(timeout):
                    if key.data == "accept":
                        self._accept(sel)
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        pipe, from_client = key.data
                        self._read(sel, pipe, from_client)
        finally:
            self._reset_all(sel)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self.refuse:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                _reset(client)
                continue
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(client, server)
            with self._lock:
                self._pipes.append(pipe)
                self.accepted += 1
            sel.register(client, selectors.EVENT_READ, (pipe, True))
            sel.register(server, selectors.EVENT_READ, (pipe, False))

    def _read(self, sel: selectors.BaseSelector, pipe: _Pipe, from_client: bool) -> None:
        sock = pipe.client if from_client else pipe.server
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(sel, pipe, graceful=True)
            return
        queue = pipe.to_server if from_client else pipe.to_client
        queue.append((time.monotonic() + self.latency, data))

    def _deliver_due(self) -> float:
        """Send what is due; return how long the selector may sleep."""
        now = time.monotonic()
        sleep = 0.05
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            if pipe.closed:
                continue
            for queue, target in ((pipe.to_server, pipe.server), (pipe.to_client, pipe.client)):
                while queue and not self.stall:
                    due, data = queue[0]
                    if due > now:
                        sleep = min(sleep, due - now)
                        break
                    queue.popleft()
                    try:
                        target.setblocking(True)
                        target.settimeout(5.0)
                        target.sendall(data)
                        target.setblocking(False)
                    except OSError:
                        pipe.closed = True
                        break
        with self._lock:
            dead = [p for p in self._pipes if p.closed]
        for pipe in dead:
            self._forget(pipe)
        return max(0.0, sleep)

    def _close_pipe(self, sel: selectors.BaseSelector, pipe: _Pipe, *, graceful: bool) -> None:
        # Flush what already arrived for the other side, then close both (a clean EOF on one
        # side becomes a clean close of the other, as a real network path would do).
        if graceful and not self.stall:
            for queue, target in ((pipe.to_server, pipe.server), (pipe.to_client, pipe.client)):
                for _, data in queue:
                    with contextlib.suppress(OSError):
                        target.setblocking(True)
                        target.settimeout(1.0)
                        target.sendall(data)
        for sock in (pipe.client, pipe.server):
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            if graceful:
                with contextlib.suppress(OSError):
                    sock.close()
            else:
                _reset(sock)
        pipe.closed = True
        self._forget(pipe)

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            if pipe in self._pipes:
                self._pipes.remove(pipe)
        for sock in (pipe.client, pipe.server):
            with contextlib.suppress(OSError):
                sock.close()

    def _reset_all(self, sel: selectors.BaseSelector) -> None:
        with self._lock:
            pipes = list(self._pipes)
            if pipes:
                self.cuts += 1
        for pipe in pipes:
            pipe.to_client.clear()
            pipe.to_server.clear()
            self._close_pipe(sel, pipe, graceful=False)


# ============================================================================== markers


class Markers:
    """Counts task executions: every execution appends ``<task id>\\n`` to a file of its
    process in ``folder`` (``O_APPEND``, one ``write``: whole lines even when the process
    is SIGKILLed right after). The folder is not the system under test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def counts(self) -> collections.Counter[str]:
        runs: collections.Counter[str] = collections.Counter()
        for path in self.folder.glob("*.log"):
            for line in path.read_text().splitlines():
                if line:
                    runs[line] += 1
        return runs


# ============================================================================== workers


@dataclass
class WorkerProcs:
    """Worker subprocesses started through the CLI (``python -m conveyor.cli -A fault_app
    worker``), with ``env``; their output goes to ``log_dir``. :meth:`stop_all` always ends
    every one (use in ``finally``)."""

    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kills: int = 0

    def start(
        self, *, pool: str = "threads", concurrency: int = 4, loglevel: str = "warning",
        extra: tuple[str, ...] = (), app: str = "fault_app",
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        index = len(self.procs)
        log = (self.log_dir / f"worker-{index}.log").open("ab")
        argv = [
            sys.executable, "-m", "conveyor.cli", "-A", app, "worker", "-P", pool,
            "-c", str(concurrency), "-l", loglevel, "-n", f"fault-{index}@localhost", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.log_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and every process of its session (prefork children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.kills += 1

    def stop_all(self) -> None:
        stop_process_groups(self.procs, 15.0)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log"))
        )


def worker_env(broker: str, backend: str, markers: Path, **extra: str) -> dict[str, str]:
    """Environment for ``fault_app`` worker subprocesses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        FAULT_BROKER=broker,
        FAULT_BACKEND=backend,
        FAULT_MARKERS=str(markers),
        PYTHONPATH=os.pathsep.join(
            [str(FAULTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# ======================================================================= private servers


class PrivateRedis:
    """A redis-server on a private loopback port (never the machine's 6379), with an
    append-only file fsynced on every write, so a restart (even SIGKILL) keeps every
    acknowledged write. :meth:`restart` kills and starts it again on the same port."""

    def __init__(self, folder: Path, *, binary: str = "redis-server") -> None:
        exe = shutil.which(binary) or f"/usr/bin/{binary}"
        if not os.access(exe, os.X_OK):
            raise FileNotFoundError(binary)
        self.exe = exe
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
            "--protected-mode", "no",
        ]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.port, 20.0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` as the ``postgres`` user) on a
    private loopback port, trust auth, ``fsync=off`` (a process restart keeps committed data
    in the OS cache; only a machine crash would lose it). :meth:`restart` stops it with
    ``-m immediate`` (like a crash: no checkpoint, recovery on start) and starts it again."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            raise FileNotFoundError("initdb/pg_ctl")
        self.bindir = bindir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="conveyor-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.restarts = 0
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        cmd = list(argv)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run(
            f"{self.bindir}/initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            f"{self.bindir}/pg_ctl", "-D", str(self.data), "-o", opts,
            "-l", str(self.folder / "pg.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        wait_port(self.port, 30.0)

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop("immediate")
        self.start()
        self.restarts += 1

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def _pg_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).resolve().parent)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return str(candidates[-1].parent) if candidates else None


# ============================================================================== figures


def report_path() -> Path:
    """Where the figures go (see the module docstring)."""
    given = os.environ.get("CONVEYOR_FAULTS_REPORT")
    if given:
        return Path(given)
    tox_work = os.environ.get("TOX_WORK_DIR")
    if tox_work:
        return Path(tox_work) / "reports" / "faults.json"
    return REPO / ".tox" / "reports" / "faults.json"


def record_figures(scenario: str, **figures: Any) -> dict[str, Any]:
    """Record one scenario's figures (replacing an earlier row of the same scenario) and
    print them, so they also show in the test log. Returns the row."""
    row = {"scenario": scenario, **figures, "recorded_at": _now()}
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
            except json.JSONDecodeError:
                data = {}
            rows = data.setdefault("rows", {})
            rows[scenario] = row
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    print(f"\nFIGURES {json.dumps(row, sort_keys=True, default=str)}")
    return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ============================================================================ targets

REDIS_URL = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("CONVEYOR_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
MONGODB_URL = os.environ.get("CONVEYOR_TEST_MONGODB_URL", "mongodb://127.0.0.1:27017/conveyor_test")
MEMCACHED_URL = os.environ.get("CONVEYOR_TEST_MEMCACHED_URL", "cache+memcached://127.0.0.1:11211/")


@dataclass(frozen=True)
class Target:
    """A broker under test, the result backend the test reads results from, and the
    server(s) that must answer."""

    name: str
    broker: str
    backend: str
    ports: tuple[int, ...]
    service: str


def _port_of(url: str, default: int) -> int:
    from urllib.parse import urlsplit

    rest = url.split("://", 1)[1]
    netloc = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    try:
        return urlsplit(f"x://{netloc}").port or default
    except ValueError:
        return default


def target(name: str, tmp_path: Path) -> Target:
    """The broker/backend pair ``name`` (redis, amqp, postgres, sqlite, mysql, mongodb);
    skips locally and fails under CI when its server does not answer."""
    from conveyor.testing.support import service_unavailable

    redis_port = _port_of(REDIS_URL, 6379)
    targets = {
        "redis": Target("redis", REDIS_URL, REDIS_URL, (redis_port,), "Redis"),
        # rpc:// results are for the sending client only; the fault tests read results
        # from Redis, so the AMQP figures are about the broker alone.
        "amqp": Target(
            "amqp", AMQP_URL, REDIS_URL, (_port_of(AMQP_URL, 5672), redis_port), "RabbitMQ"
        ),
        "postgres": Target(
            "postgres",
            f"sqla+{POSTGRES_URL}",
            f"db+{POSTGRES_URL}",
            (_port_of(POSTGRES_URL, 5432),),
            "PostgreSQL",
        ),
        "sqlite": Target(
            "sqlite",
            f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            f"db+sqlite:///{tmp_path / 'results.db'}",
            (),
            "SQLite",
        ),
        "mysql": Target(
            "mysql",
            f"sqla+{MYSQL_URL}",
            f"db+{MYSQL_URL}",
            (_port_of(MYSQL_URL, 3306),),
            "MariaDB",
        ),
        "mongodb": Target(
            "mongodb", MONGODB_URL, MONGODB_URL, (_port_of(MONGODB_URL, 27017),), "MongoDB"
        ),
    }
    found = targets[name]
    for port in found.ports:
        try:
            wait_port(port, 2.0)
        except OSError as exc:
            service_unavailable(found.service, found.broker, exc)
    return found


@contextlib.contextmanager
def amqp_shared_lock(name: str) -> Iterator[None]:
    """Hold the machine-wide RabbitMQ test lock shared while an AMQP test runs (the restart
    test in tests/faults/test_amqp_restart.py holds it exclusively)."""
    if name != "amqp":
        yield
        return
    from support.amqp import server_lock

    with server_lock():
        yield


def cleanup_queue(broker_url: str, queue: str) -> None:
    """Best effort: delete (AMQP) or purge a test queue and its dead letters."""
    from conveyor.core.errors import ConveyorError
    from conveyor.core.registry import broker_from_url

    with contextlib.suppress(ConveyorError, OSError):
        broker: Any = broker_from_url(broker_url)
        try:
            if hasattr(broker, "delete_queue"):
                broker.delete_queue(queue)
            else:
                broker.purge(queue)
                with contextlib.suppress(ConveyorError, AttributeError):
                    broker.purge(broker.dead_letter_queue(queue))
        finally:
            broker.close()


def stop_process_groups(procs: list[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM the process group of each process still running (a warm shutdown), wait up
    to ``grace`` seconds in all, then SIGKILL the groups that are left."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

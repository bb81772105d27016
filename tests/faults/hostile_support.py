"""Tools for the hostile-input suite (tests/faults/test_hostile_*.py, issue 13).

* :func:`place`: a broker and a result backend on a real server (or the memory/SQLite
  ones), by name; skips locally and fails under CI when the server does not answer.
* :class:`Runs`: executions counted outside the system under test (one ``O_APPEND`` line per
  run, one file per process, so prefork children and CLI workers count too). Ids are hashed
  into the line, so any id (a lone surrogate, NUL, 10 MB) counts.
* :func:`hostile_app` / :func:`register`: an app with the suite's tasks; ``-A
  hostile_support`` gives CLI workers the same app, configured by ``HOSTILE_*`` variables.
* :func:`running`: a worker thread that is always stopped; :class:`CliWorker`: a worker
  subprocess (its output captured, its peak RSS read from ``/proc``).
* :class:`Planter`: writes raw, malformed messages into a broker's own storage through its
  driver (``LPUSH``, ``INSERT``, ``insert_one``, a hand-encoded AMQP frame), as a buggy or
  hostile producer would leave them.
* :func:`settled`: ``(ready, dead letters)`` of a queue, counted in the store itself.

Figures go through :func:`faultsupport.record_figures` with ``kind="hostile"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.faults import (
    AMQP_URL,
    MEMCACHED_URL,
    MONGODB_URL,
    MYSQL_URL,
    POSTGRES_URL,
    REDIS_URL,
    _port_of,
    record_figures,
    stop_process_groups,
    wait_port,
)

from conveyor import App, Envelope
from conveyor.testing.support import service_unavailable, unique_name

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent

#: Brokers the suite runs on (memory only where one process is enough).
BROKERS = ["memory", "sqlite", "postgres", "mysql", "redis", "amqp", "quorum", "mongodb"]
#: Result backends the suite runs on.
BACKENDS = ["memory", "sqlite", "postgres", "mysql", "redis", "rpc", "mongodb", "memcached"]
#: Brokers whose messages a separate process can see (CLI workers).
SHARED_BROKERS = [b for b in BROKERS if b != "memory"]

QUORUM_URL = AMQP_URL + ("&" if "?" in AMQP_URL else "?") + "queue_type=quorum"

log = logging.getLogger("hostile")


# ================================================================================ places


@dataclass(frozen=True)
class Place:
    """A broker URL and a result backend URL, and what they are called."""

    broker_name: str
    backend_name: str
    broker: str
    backend: str

    @property
    def name(self) -> str:
        if self.broker_name == self.backend_name:
            return self.broker_name
        return f"{self.broker_name}+{self.backend_name}"

    @property
    def amqp(self) -> bool:
        return self.broker_name in ("amqp", "quorum")


#: The backend each broker is paired with when a test is about the broker.
DEFAULT_BACKEND = {
    "memory": "memory",
    "sqlite": "sqlite",
    "postgres": "postgres",
    "mysql": "mysql",
    "redis": "redis",
    "amqp": "redis",
    "quorum": "redis",
    "mongodb": "mongodb",
}
#: The broker each backend is paired with when a test is about the backend.
BROKER_FOR_BACKEND = {"rpc": "amqp"}

_SERVICES = {
    "postgres": ("PostgreSQL", POSTGRES_URL, 5432),
    "mysql": ("MariaDB", MYSQL_URL, 3306),
    "redis": ("Redis", REDIS_URL, 6379),
    "amqp": ("RabbitMQ", AMQP_URL, 5672),
    "quorum": ("RabbitMQ", AMQP_URL, 5672),
    "rpc": ("RabbitMQ", AMQP_URL, 5672),
    "mongodb": ("MongoDB", MONGODB_URL, 27017),
    "memcached": ("memcached", MEMCACHED_URL, 11211),
}


def _require(name: str) -> None:
    if name not in _SERVICES:
        return
    service, url, default = _SERVICES[name]
    try:
        wait_port(_port_of(url, default), 2.0)
    except OSError as exc:
        service_unavailable(service, url, exc)


def broker_url(name: str, folder: Path) -> str:
    return {
        "memory": "memory://",
        "sqlite": f"sqla+sqlite:///{folder / 'broker.db'}",
        "postgres": f"sqla+{POSTGRES_URL}",
        "mysql": f"sqla+{MYSQL_URL}",
        "redis": REDIS_URL,
        "amqp": AMQP_URL,
        "quorum": QUORUM_URL,
        "mongodb": MONGODB_URL,
    }[name]


def backend_url(name: str, folder: Path) -> str:
    return {
        "memory": "memory://",
        "sqlite": f"db+sqlite:///{folder / 'results.db'}",
        "postgres": f"db+{POSTGRES_URL}",
        "mysql": f"db+{MYSQL_URL}",
        "redis": REDIS_URL,
        "rpc": "rpc://",
        "mongodb": MONGODB_URL,
        "memcached": MEMCACHED_URL,
    }[name]


def place(broker: str, folder: Path, backend: str | None = None) -> Place:
    """The broker ``broker`` with ``backend`` (default: :data:`DEFAULT_BACKEND`); skips
    (locally) or fails (CI) when a server does not answer."""
    backend = backend or DEFAULT_BACKEND[broker]
    for name in {broker, backend}:
        _require(name)
    return Place(broker, backend, broker_url(broker, folder), backend_url(backend, folder))


def backend_place(backend: str, folder: Path) -> Place:
    """A place to test the result backend ``backend``: on the memory broker (one process),
    except rpc://, which needs RabbitMQ."""
    return place(BROKER_FOR_BACKEND.get(backend, "memory"), folder, backend)


@contextlib.contextmanager
def server_lock(where: Place) -> Iterator[None]:
    """The machine-wide RabbitMQ lock, shared, when ``where`` uses RabbitMQ (the restart
    test holds it exclusively)."""
    if not (where.amqp or where.backend_name == "rpc"):
        yield
        return
    from support.amqp import server_lock as lock

    with lock():
        yield


def cleanup(where: Place, *queues: str) -> None:
    """Best effort: delete (AMQP) or purge the queues and their dead letters."""
    from conveyor.core.errors import ConveyorError
    from conveyor.core.registry import broker_from_url

    if where.broker_name == "memory":
        return
    with contextlib.suppress(ConveyorError, OSError):
        broker: Any = broker_from_url(where.broker)
        try:
            for queue in queues:
                for name in (queue, f"{queue}.dead", f"{queue}.dead.dead"):
                    with contextlib.suppress(ConveyorError, OSError):
                        if hasattr(broker, "delete_queue"):
                            broker.delete_queue(name)
                        else:
                            broker.purge(name)
        finally:
            broker.close()


def settled(app: App, queue: str) -> tuple[int, int]:
    """(messages ready in ``queue``, messages in its dead-letter queue)."""
    broker = app.broker
    return broker.size(queue), broker.size(broker.dead_letter_queue(queue))


# ================================================================================ runs


def run_key(task_id: Any) -> str:
    """The marker line of ``task_id``: any id (surrogates, NUL, megabytes) as 40 hex."""
    text = task_id if isinstance(task_id, str) else repr(task_id)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class Runs:
    """Counts executions in ``folder``: each appends its task id's key to a file of its
    process (``O_APPEND``, one ``write``: whole lines even under SIGKILL)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def mark(self, task_id: Any) -> None:
        fd = os.open(self.folder / f"{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, f"{run_key(task_id)}\n".encode())
        finally:
            os.close(fd)

    def counts(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for path in self.folder.glob("*.log"):
            found.update(line for line in path.read_text().splitlines() if line)
        return found

    def count(self, task_id: Any) -> int:
        return self.counts()[run_key(task_id)]

    def total(self) -> int:
        return sum(self.counts().values())


# ================================================================================ the app


class Opaque:
    """A return value no result serializer here can encode (JSON cannot), which pickle can
    carry from a prefork child to its parent."""

    def __repr__(self) -> str:
        return "<Opaque>"


def _explode() -> None:
    raise RuntimeError("this value cannot be unpickled")


class Explosive:
    """Pickles in a prefork child; unpickling it in the parent raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def register(app: App, runs: Runs) -> dict[str, Any]:
    """The suite's tasks on ``app``; each execution is marked in ``runs`` first."""
    tasks: dict[str, Any] = {}

    def task(name: str) -> Callable[[Callable[..., Any]], Any]:
        def decorate(fn: Callable[..., Any]) -> Any:
            made = app.task(name=f"h.{name}", bind=True)(fn)
            tasks[name] = made
            return made

        return decorate

    @task("count")
    def count(self: Any, n: Any = 0, *rest: Any, **kw: Any) -> Any:
        runs.mark(self.request.id)
        return n

    @task("retry_once")
    def retry_once(self: Any) -> str:
        """Asks for one retry at once, then succeeds."""
        runs.mark(self.request.id)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "retried"

    @task("unpicklable")
    def unpicklable(self: Any) -> Any:
        runs.mark(self.request.id)
        return lambda: None

    @task("explosive")
    def explosive(self: Any) -> Explosive:
        runs.mark(self.request.id)
        return Explosive()

    @task("huge")
    def huge(self: Any, mib: float) -> str:
        """Returns ``mib`` MiB of text: more than some result stores take in one value."""
        runs.mark(self.request.id)
        return "x" * int(mib * (1 << 20))

    @task("opaque")
    def opaque(self: Any) -> Opaque:
        runs.mark(self.request.id)
        return Opaque()

    @task("leave")
    def leave(self: Any, how: str) -> None:
        runs.mark(self.request.id)
        if how == "exit":
            raise SystemExit(3)
        if how == "interrupt":
            raise KeyboardInterrupt
        if how == "generator":
            raise GeneratorExit
        raise BaseException("a bare BaseException")

    @task("die")
    def die(self: Any, times: int = 1_000_000) -> int:
        """Kills its process (as the OOM killer would) the first ``times`` runs."""
        runs.mark(self.request.id)
        if runs.count(self.request.id) <= times:
            os._exit(1)
        return os.getpid()

    @task("busy")
    def busy(self: Any, seconds: float) -> str:
        """Busy in Python for ``seconds`` (short sleeps: a soft limit lands within ~10 ms)."""
        from conveyor.runtime.exceptions import SoftTimeLimitExceeded

        runs.mark(self.request.id)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "soft"
        return "finished"

    @task("spin")
    def spin(self: Any, seconds: float) -> str:
        """Busy for ``seconds``, catching nothing: a soft limit fails it."""
        runs.mark(self.request.id)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "finished"

    @task("stubborn")
    def stubborn(self: Any, seconds: float) -> str:
        """Ignores its soft limit for ``seconds``: only a hard limit stops it."""
        from conveyor.runtime.exceptions import SoftTimeLimitExceeded

        runs.mark(self.request.id)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(SoftTimeLimitExceeded):
                time.sleep(0.01)
        return "finished"

    @task("sleep")
    def sleep(self: Any, seconds: float) -> int:
        """Marks its start (``<id>``), sleeps (the workload), marks its end (``<id>/done``):
        a run cut short has a start and no end."""
        runs.mark(self.request.id)
        time.sleep(seconds)
        runs.mark(f"{self.request.id}/done")
        return 1

    return tasks


def hostile_app(where: Place, runs: Runs, **settings: Any) -> tuple[App, dict[str, Any]]:
    """An app on ``where`` with the suite's tasks."""
    settings.setdefault("worker_lease_seconds", 2.0)
    app = App("hostile", broker=where.broker, backend=where.backend, **settings)
    return app, register(app, runs)


def _env_app() -> App:
    """The app of a CLI worker (``-A hostile_support``), from ``HOSTILE_*`` variables."""
    settings = json.loads(os.environ.get("HOSTILE_SETTINGS", "{}"))
    app = App(
        "hostile",
        broker=os.environ["HOSTILE_BROKER"],
        backend=os.environ["HOSTILE_BACKEND"],
        **settings,
    )
    register(app, Runs(Path(os.environ["HOSTILE_RUNS"])))
    return app


_cli_app: App | None = None


def __getattr__(name: str) -> Any:
    # ``conveyor -A hostile_support worker`` reads ``app``: built on first access only, so
    # the test process importing this module builds nothing.
    global _cli_app
    if name == "app" and "HOSTILE_BROKER" in os.environ:
        if _cli_app is None:
            _cli_app = _env_app()
        return _cli_app
    raise AttributeError(name)


# ================================================================================ workers


@contextlib.contextmanager
def running(app: App, **options: Any) -> Iterator[tuple[Any, threading.Thread]]:
    """A worker thread for ``app``, warm-stopped (and checked stopped) on the way out."""
    options.setdefault("receive_timeout", 0.1)
    options.setdefault("pool", "threads")
    options.setdefault("concurrency", 2)
    worker = app.Worker(**options)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(60), "worker did not start"
        yield worker, thread
    finally:
        worker.stop()
        thread.join(60)
        assert not thread.is_alive(), "worker did not stop"


def conveyor_cmd() -> list[str]:
    return [sys.executable, "-m", "conveyor.cli"]


def cli_env(extra_paths: tuple[Path, ...] = (), **values: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this suite's modules importable, no inherited
    ``CONVEYOR_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "HOSTILE_"))}
    paths = [*map(str, extra_paths), str(HERE), str(TESTS)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **values)
    return env


class CliWorker:
    """``conveyor -A hostile_support worker`` in its own session, output to a file."""

    def __init__(
        self, where: Place, runs: Runs, folder: Path, *, settings: dict[str, Any] | None = None
    ) -> None:
        self.folder = folder
        self.env = cli_env(
            HOSTILE_BROKER=where.broker,
            HOSTILE_BACKEND=where.backend,
            HOSTILE_RUNS=str(runs.folder),
            HOSTILE_SETTINGS=json.dumps(settings or {}),
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *, queue: str, pool: str = "threads", concurrency: int = 2, loglevel: str = "info"
    ) -> subprocess.Popen[bytes]:
        index = len(self.procs)
        with (self.folder / f"worker-{index}.log").open("ab") as out:
            proc = subprocess.Popen(
                [*conveyor_cmd(), "-A", "hostile_support", "worker", "-P", pool,
                 "-c", str(concurrency), "-l", loglevel, "-Q", queue,
                 "-n", f"hostile-{index}@localhost"],
                env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Until the worker logs that it consumes (needs ``-l info``)."""
        index = self.procs.index(proc)

        def ready() -> bool:
            assert proc.poll() is None, f"worker exited: {self.log(index)[-3000:]}"
            return "ready: consuming" in self.log(index)

        from conveyor.testing.support import eventually

        eventually(ready, timeout, message="the CLI worker consumes")

    def log(self, index: int | None = None) -> str:
        paths = sorted(self.folder.glob("worker-*.log"))
        if index is not None:
            paths = [self.folder / f"worker-{index}.log"]
        return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())

    def stop_all(self) -> None:
        stop_process_groups(self.procs, 30.0)


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far (``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


# ================================================================================ raw planting


def _short(raw: bytes) -> bytes:
    return struct.pack("B", len(raw)) + raw


def _table(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _deep_table(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = _short(b"a") + b"F" + _table(inner)
    return _table(inner)


def _kombu(headers: str = '{"id": "x"}', body: str = '"e30="', **props: str) -> bytes:
    properties = ", ".join(f'"{k}": {v}' for k, v in {"body_encoding": '"base64"', **props}.items())
    return (
        f'{{"body": {body}, "content-encoding": "utf-8", "content-type": "application/json", '
        f'"headers": {headers}, "properties": {{{properties}}}}}'
    ).encode()


class Planter:
    """Writes malformed messages into ``queue`` of broker ``where`` behind the broker's
    back, through the driver. :meth:`kinds` names what :meth:`plant` can write there."""

    def __init__(self, where: Place, app: App) -> None:
        self.where = where
        self.app = app
        self._raw: Any = None

    def kinds(self) -> list[str]:
        return list(self._catalogue())

    def _catalogue(self) -> dict[str, Any]:
        name = self.where.broker_name
        if name == "redis":
            return {
                "not-json": b"\xffnot json",
                "infinity-priority": _kombu(priority="Infinity"),
                "text-priority": _kombu(priority='"high"'),
                "headers-a-list": _kombu(headers="[]"),
                "headers-null": _kombu(headers="null"),
                "bad-base64": _kombu(body='"!!!"'),
                "body-a-number": _kombu(body="42"),
                "a-json-array": b"[1, 2, 3]",
                "nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
                "empty": b"",
                "two-headers": (
                    b'{"body": "", "headers": {"a": 1}, "properties": {}, "headers": {"b": 2}}'
                ),
            }
        if name in ("sqlite", "postgres", "mysql"):
            rows: dict[str, Any] = {
                "headers-not-json": {"headers": "not json at all"},
                "headers-a-list": {"headers": "[1, 2]"},
                "headers-null": {"headers": "null"},
                "headers-truncated": {"headers": '{"task": "t", '},
                "headers-nested-too-deep": {"headers": "[" * 20_000 + "]" * 20_000},
                "headers-empty": {"headers": ""},
            }
            if name == "sqlite":  # SQLite keeps text in BLOB and INTEGER columns
                rows["body-is-text"] = {"body": "not bytes"}
                rows["priority-is-text"] = {"priority": "high"}
            return rows
        if name == "mongodb":
            return {
                "headers-not-json": {"headers": "nope"},
                "headers-a-list": {"headers": "[1, 2]"},
                "headers-a-subdocument": {"headers": {"task": "t"}},
                "id-a-map": {"message_id": {"$ne": None}},
                "id-a-number": {"message_id": 42},
                "body-a-string": {"body": "text"},
                "priority-text": {"priority": "high"},
                "content-type-missing": {"content_type": None},
            }
        if name in ("amqp", "quorum"):
            import pika

            props = pika.BasicProperties
            return {
                "message-id-not-utf8": (props.FLAG_MESSAGE_ID, [_short(b"\xff\xfe")]),
                "header-key-not-utf8": (props.FLAG_HEADERS, [_table(_short(b"\xffk") + b"V")]),
                "headers-nested-too-deep": (props.FLAG_HEADERS, [_deep_table(3000)]),
                "content-type-not-utf8": (props.FLAG_CONTENT_TYPE, [_short(b"\xc3")]),
            }
        if name == "memory":  # objects, not bytes: the wrong Python types
            return {
                "body-a-str": {"body": "text"},
                "content-type-a-map": {"content_type": {"$gt": ""}},
                "body-none": {"body": None},
                "encoding-a-number": {"content_encoding": 8},
            }
        raise ValueError(name)

    def plant(self, queue: str, kind: str) -> None:
        spec = self._catalogue()[kind]
        name = self.where.broker_name
        if name == "redis":
            self.app.broker.client.lpush(queue, spec)
        elif name in ("sqlite", "postgres", "mysql"):
            self._sql_insert(queue, f"bad-{kind}", spec)
        elif name == "mongodb":
            self._mongo_insert(queue, f"bad-{kind}", spec)
        elif name in ("amqp", "quorum"):
            self._amqp_publish(queue, kind, *spec)
        elif name == "memory":
            fields = {"id": f"bad-{kind}", "body": b"[[], {}, {}]", **spec}
            envelope = Envelope(id=fields.pop("id"), body=b"")
            for key, value in fields.items():
                object.__setattr__(envelope, key, value)
            self.app.broker.publish(envelope, queue=queue)

    def plant_envelope(self, queue: str, envelope: Any, **overrides: Any) -> None:
        """Write a well-formed message the way a foreign JSON writer would: headers as
        ASCII-escaped JSON text (so a lone surrogate travels as ``\\ud800``), ids that the
        column cannot hold replaced. SQL and MongoDB brokers only."""
        headers = json.dumps(dict(envelope.headers))  # ensure_ascii: escapes, never raw

        def text(value: Any) -> Any:
            try:
                value.encode("utf-8")
            except (UnicodeEncodeError, AttributeError):
                return None
            return None if "\x00" in value else value

        fields = {
            "headers": headers,
            "body": bytes(envelope.body),
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "correlation_id": text(envelope.correlation_id),
        }
        fields.update(overrides)
        safe_id = text(envelope.id) or unique_name("planted")
        if self.where.broker_name == "mongodb":
            self._mongo_insert(queue, safe_id, fields)
        else:
            self._sql_insert(queue, safe_id, fields)

    def _sql_insert(self, queue: str, envelope_id: str, row: dict[str, Any]) -> None:
        import sqlalchemy as sa

        broker: Any = self.app.broker
        values = {
            "queue": queue, "priority": 0, "delayed": False, "not_before": 0.0,
            "lease_expires": 0.0, "delivery_count": 0, "envelope_id": envelope_id,
            "body": b"[[], {}, {}]", "content_type": "application/json",
            "content_encoding": "utf-8", "headers": "{}", "published_at": time.time(), **row,
        }  # fmt: skip
        quote = broker.engine.dialect.identifier_preparer.quote
        names = ", ".join(quote(k) for k in values)
        marks = ", ".join(f":{k}" for k in values)
        with broker.engine.begin() as conn:
            conn.execute(
                sa.text(f"INSERT INTO conveyor_message ({names}) VALUES ({marks})"), values
            )

    def _mongo_insert(self, queue: str, message_id: str, fields: dict[str, Any]) -> None:
        from datetime import datetime, timezone

        from bson import Binary

        now = datetime.now(timezone.utc)
        doc = {
            "queue": queue, "state": "ready", "priority": 0, "due": now, "lease_owner": None,
            "lease_expires": datetime(1970, 1, 1, tzinfo=timezone.utc), "delivery_count": 0,
            "message_id": message_id, "body": Binary(b"[[], {}, {}]"),
            "content_type": "application/json", "content_encoding": "utf-8", "headers": "{}",
            "correlation_id": None, "reply_to": None, "published_at": now, **fields,
        }  # fmt: skip
        self.app.broker.collection.insert_one(doc)  # type: ignore[attr-defined]

    def _amqp_publish(self, queue: str, kind: str, flags: int, pieces: list[bytes]) -> None:
        import pika

        class RawProperties(pika.BasicProperties):  # type: ignore[misc]
            def encode(self) -> list[bytes]:
                return [struct.pack(">H", flags), *pieces]

        if self._raw is None:
            from conveyor.transports.amqp import parse_amqp_url

            endpoint = parse_amqp_url(AMQP_URL)[0][0]
            self._raw = pika.BlockingConnection(
                pika.ConnectionParameters(
                    host=endpoint.host,
                    port=endpoint.port,
                    virtual_host=endpoint.vhost,
                    credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
                )
            )
        channel = self._raw.channel()
        channel.basic_publish("", queue, kind.encode(), RawProperties())
        channel.close()

    def close(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.close()
            self._raw = None


# ================================================================================ messages


def celery_envelope(task: str, task_id: Any, *, args: tuple[Any, ...] = (), **fields: Any) -> Any:
    """A protocol-2 message as a Celery client (or a forger) would send it: ``task_id`` may
    be anything, and ``fields`` override headers."""
    from conveyor.core.celery import TaskMessage, build_envelope

    safe_id = unique_name("forged")
    envelope = build_envelope(TaskMessage(task=task, id=safe_id, args=args))
    headers = dict(envelope.headers)
    headers["id"] = task_id
    headers.update(fields)
    correlation = task_id if isinstance(task_id, str) else safe_id
    return dataclasses.replace(envelope, headers=headers, correlation_id=correlation)


def figures(klass: str, where: str, **values: Any) -> None:
    """One row of the hostile suite's figures (``hostile/<class>/<where>``)."""
    record_figures(f"hostile/{klass}/{where}", kind="hostile", klass=klass, where=where, **values)


def no_secret(text: str, secrets: list[str], where: str) -> None:
    """Fail, showing the context (with the secret cut out), when a secret is in ``text``."""
    for secret in secrets:
        at = text.find(secret)
        if at >= 0:
            context = text[max(0, at - 120) : at] + "<SECRET>" + text[at + len(secret) :][:120]
            raise AssertionError(f"secret {secret[:3]}... leaked in {where}: {context!r}")

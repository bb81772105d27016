"""Security: pickle refused by default (a malicious pickle runs nothing), message signing end
to end, TLS URLs reaching the drivers, and passwords absent from every log line, error,
``repr`` and CLI output.

The signing and pickle tests run on the memory implementations (the ``memory`` tox env). The
TLS and password tests need the drivers and a Redis server binary: they skip where those are
missing (``memory`` env) and run in the ``faults`` env, which installs every extra.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from conveyor import App, Envelope
from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.signing import SIGNATURE_HEADER, Signer
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually, requirement_missing

KEY = "current-signing-key-0123456789abcdef"
OLD_KEY = "previous-signing-key-0123456789abcd"
PASSWORD = "Pa55:w@rd/%zZ-" + uuid.uuid4().hex[:8]


class _Evil:
    """Unpickling this creates the file at ``path``: what an attacker's payload would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _start(app: App, **options: Any) -> tuple[Worker, threading.Thread]:
    options.setdefault("pool", "threads")
    options.setdefault("concurrency", 2)
    worker = app.Worker(receive_timeout=0.1, **options)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert worker.wait_started(10)
    return worker, thread


@pytest.fixture
def run(app: App) -> Iterator[Callable[..., Worker]]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(application: App | None = None, **options: Any) -> Worker:
        pair = _start(application or app, **options)
        started.append(pair)
        return pair[0]

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(15)


# ------------------------------------------------------------------------- pickle


def test_pickle_is_not_accepted_by_default() -> None:
    app = App("sec", broker="memory://", backend="memory://")
    assert tuple(app.conf.accept_content) == ("json",)
    assert "pickle" not in app.conf.task_serializer


def test_a_malicious_pickle_is_dead_lettered_without_being_unpickled(
    app: App, run: Callable[..., Worker], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="sec.ok")
    def ok() -> str:
        return "ok"

    # The payload is real: unpickling it creates the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(((_Evil(str(probe)),), {}, {})))
    assert probe.exists()

    target = tmp_path / "pwned"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((_Evil(str(target)),), {}, {}))
    evil = Envelope(
        id=task_id,
        body=body,
        content_type="application/x-python-serialize",
        content_encoding="binary",
        headers={"lang": "py", "task": "sec.ok", "id": task_id},
    )
    before = ok.delay()
    app.broker.publish(evil, queue="celery")
    after = ok.delay()
    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    run()
    assert before.get(timeout=10) == after.get(timeout=10) == "ok"
    dlq = app.broker.dead_letter_queue("celery")
    eventually(lambda: app.broker.size(dlq) == 1, 10, message="pickle dead-lettered")
    assert app.AsyncResult(task_id).state == "PENDING"  # refused: no result written
    assert not target.exists(), "the pickle was loaded"
    assert any(f"dead-lettering message {task_id}" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- signing


def _signed_app(key: Any, name: str = "signed") -> App:
    return App(
        name, broker="memory://", backend="memory://", security_key=key, worker_lease_seconds=1.0
    )


def test_signed_tasks_run_and_unsigned_or_forged_ones_are_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _signed_app(KEY)
    try:

        @app.task(name="sec.add")
        def add(x: int, y: int) -> int:
            return x + y

        good = add.delay(2, 3)
        broker = app.broker
        # captured in flight: the signed envelope of a real task
        (delivery,) = broker.receive("celery", timeout=1.0)
        signed = delivery.envelope
        broker.reject(delivery, requeue=True)
        assert signed.headers[SIGNATURE_HEADER].startswith("v1:")

        forged: dict[str, Envelope] = {}

        def forge(kind: str, make: Callable[[str], Envelope]) -> None:
            task_id = f"{kind}-{uuid.uuid4().hex[:8]}"
            forged[kind] = make(task_id)

        plain = build_envelope(TaskMessage(task="sec.add", id="x", args=(1, 1)))
        forge("unsigned", lambda t: replace(plain, id=t, headers={**plain.headers, "id": t}))
        forge(
            "wrong-key",
            lambda t: Signer("an-attackers-key-0123456789abcdef").sign(
                replace(plain, id=t, headers={**plain.headers, "id": t})
            ),
        )
        forge(
            "tampered-body",
            lambda t: replace(
                Signer(KEY).sign(replace(plain, id=t, headers={**plain.headers, "id": t})),
                body=plain.body.replace(b"1, 1", b"1, 9"),
            ),
        )
        stolen = signed.headers[SIGNATURE_HEADER]  # a valid signature, for another message
        forge(
            "replayed-signature",
            lambda t: replace(
                plain, id=t, headers={**plain.headers, "id": t, SIGNATURE_HEADER: stolen}
            ),
        )
        for envelope in forged.values():
            broker.publish(envelope, queue="celery")
        late = add.delay(4, 5)
        caplog.set_level(logging.ERROR, logger="conveyor.worker")
        worker, thread = _start(app)
        try:
            assert good.get(timeout=10) == 5
            assert late.get(timeout=10) == 9
            dlq = broker.dead_letter_queue("celery")
            eventually(lambda: broker.size(dlq) == len(forged), 10, message="forgeries refused")
            assert thread.is_alive()
        finally:
            worker.stop()
            thread.join(15)
        lines = [r.getMessage() for r in caplog.records]
        for kind, envelope in forged.items():
            assert any(
                f"dead-lettering message {envelope.id}" in line and "refused" in line
                for line in lines
            ), kind
            # refused: nothing written under the id it claims (it may be another task's)
            assert app.AsyncResult(envelope.id).state == "PENDING", kind
        assert worker.stats["dead_lettered"] == len(forged)
        assert worker.stats["succeeded"] == 2
    finally:
        app.close()


def test_key_rotation_old_producers_keep_working_while_workers_accept_both_keys() -> None:
    """Step 1 of a rotation: workers get [new, old]; producers still on the old key run."""
    worker_app = _signed_app([KEY, OLD_KEY], name="rotating")
    try:

        @worker_app.task(name="sec.echo")
        def echo(v: str) -> str:
            return v

        old_env = Signer(OLD_KEY).sign(
            build_envelope(TaskMessage(task="sec.echo", id="from-old", args=("old",)))
        )
        worker_app.broker.publish(old_env, queue="celery")
        new = echo.delay("new")  # the worker app itself signs with the first (new) key
        worker, thread = _start(worker_app)
        try:
            assert new.get(timeout=10) == "new"
            assert worker_app.AsyncResult("from-old").get(timeout=10) == "old"
        finally:
            worker.stop()
            thread.join(15)
    finally:
        worker_app.close()


def test_a_worker_without_a_key_still_accepts_signed_messages() -> None:
    """Signing is opt-in per side: turning it on for producers first breaks nothing."""
    app = App("mixed", broker="memory://", backend="memory://")
    try:

        @app.task(name="sec.one")
        def one() -> int:
            return 1

        env = Signer(KEY).sign(build_envelope(TaskMessage(task="sec.one", id="signed-1")))
        app.broker.publish(env, queue="celery")
        worker, thread = _start(app)
        try:
            assert app.AsyncResult("signed-1").get(timeout=10) == 1
        finally:
            worker.stop()
            thread.join(15)
    finally:
        app.close()


def test_a_bad_security_key_fails_at_send_and_at_worker_start() -> None:
    from conveyor.core.errors import ConfigurationError

    app = App("badkey", broker="memory://", backend="memory://", security_key="short")
    try:

        @app.task(name="sec.n")
        def n() -> None:
            return None

        with pytest.raises(ConfigurationError, match="too short"):
            n.delay()
        with pytest.raises(ConfigurationError, match="too short"):
            app.Worker(pool="solo")
    finally:
        app.close()


# ------------------------------------------------------------------------- TLS URLs


def test_rediss_urls_reach_redis_py_as_tls_connections(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    from conveyor.backends.redis import RedisResultBackend
    from conveyor.transports.redis import RedisBroker

    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    url = f"rediss://:{PASSWORD}@127.0.0.1:1/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    for cls in (RedisBroker, RedisResultBackend):
        made: Any = cls.from_url(url)
        try:
            pool = made.client.connection_pool
            assert issubclass(pool.connection_class, redis.SSLConnection)
            kwargs = pool.connection_kwargs
            assert kwargs["ssl_ca_certs"] == str(ca)
            import ssl

            assert kwargs["ssl_cert_reqs"] in ("required", ssl.CERT_REQUIRED)
            assert PASSWORD not in repr(made)
        finally:
            made.close()
    plain: Any = RedisBroker.from_url("redis://127.0.0.1:1/0")
    try:
        assert not issubclass(plain.client.connection_pool.connection_class, redis.SSLConnection)
    finally:
        plain.close()


def test_amqps_urls_reach_pika_with_a_tls_context() -> None:
    pytest.importorskip("pika")
    import ssl

    from conveyor._drivers.amqp.options import connection_parameters
    from conveyor.transports.amqp import AMQPBroker

    broker = AMQPBroker.from_url(f"amqps://guest:{PASSWORD}@127.0.0.1//?ssl_cert_reqs=required")
    try:
        link: Any = broker._link
        (params,) = [connection_parameters(e, link.options, name="t") for e in link.endpoints]
        assert params.port == 5671  # the AMQPS default
        assert params.ssl_options is not None
        assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
        assert params.ssl_options.context.check_hostname
        assert params.ssl_options.server_hostname == "127.0.0.1"
        assert PASSWORD not in repr(broker)
    finally:
        broker.close()


def test_mongodb_tls_options_reach_pymongo() -> None:
    pytest.importorskip("pymongo")
    from conveyor.backends.mongodb import MongoDBResultBackend
    from conveyor.transports.mongodb import MongoDBBroker

    url = (
        f"mongodb://u:{quote(PASSWORD, safe='')}"
        "@127.0.0.1:1/db?tls=true&tlsAllowInvalidHostnames=true&serverSelectionTimeoutMS=200"
    )

    for cls in (MongoDBBroker, MongoDBResultBackend):
        made: Any = cls.from_url(url)
        try:
            options = made.client.options
            assert options.pool_options._ssl_context is not None  # TLS on every connection
            assert options.pool_options.tls_allow_invalid_hostnames is True
            assert PASSWORD not in repr(made)
        finally:
            made.close()


def test_postgresql_sslmode_reaches_the_driver_untouched() -> None:
    pytest.importorskip("psycopg")
    from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
    from conveyor.transports.sqlalchemy import SQLAlchemyBroker

    url = "postgresql+psycopg://u:pw@127.0.0.1:1/db?sslmode=require&sslrootcert=/etc/ca.pem"
    for made in (
        SQLAlchemyBroker.from_url(f"sqla+{url}"),
        SQLAlchemyResultBackend.from_url(f"db+{url}"),
    ):
        try:
            engine: Any = made.engine if hasattr(made, "engine") else made._db.engine
            _, connect_kwargs = engine.dialect.create_connect_args(engine.url)
            assert connect_kwargs["sslmode"] == "require"
            assert connect_kwargs["sslrootcert"] == "/etc/ca.pem"
        finally:
            made.close()


# ------------------------------------------------------------------------- passwords

TASKS_MODULE = """
from conveyor import App
app = App("pwtasks")

@app.task(name="pw.add")
def add(x, y):
    return x + y
"""


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


def test_a_known_password_never_appears_in_worker_or_cli_output(tmp_path: Path) -> None:
    """A private Redis with ``requirepass``; a CLI worker at debug level runs tasks with the
    password in its broker and backend URLs; ``conveyor check`` with the right password,
    with a wrong one, and against a closed port; ``conveyor call``. Every byte they print is
    searched for the password (raw and percent-encoded)."""
    pytest.importorskip("redis")
    exe = shutil.which("redis-server")
    if exe is None:
        requirement_missing("redis-server is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.faults import free_port, wait_port

    from conveyor.core.urls import mask_url

    port = free_port()
    server = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", PASSWORD, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    encoded = quote(PASSWORD, safe="")
    url = f"redis://:{encoded}@127.0.0.1:{port}/0"
    wrong = f"redis://:{encoded}x@127.0.0.1:{port}/0"
    closed = f"redis://:{encoded}@127.0.0.1:{free_port()}/0"
    (tmp_path / "pwtasks.py").write_text(TASKS_MODULE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_BROKER_URL=url, CONVEYOR_RESULT_BACKEND=url, PYTHONPATH=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )  # fmt: skip
    outputs: list[str] = []
    log = tmp_path / "worker.log"
    try:
        wait_port(port, 10)
        with log.open("wb") as sink:
            worker = subprocess.Popen(
                [sys.executable, "-m", "conveyor.cli", "-A", "pwtasks", "worker", "-l", "debug",
                 "-P", "threads", "-c", "2"],
                env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            called = _cli("-A", "pwtasks", "call", "pw.add", "--args", "[2, 3]", "--wait", "30",
                          env=env, cwd=tmp_path)  # fmt: skip
            outputs.append(called)
            assert called.strip().endswith("5"), called
            outputs.append(_cli("check", url, "-n", "3", env=env, cwd=tmp_path))
            assert "p50 ms" in outputs[-1], outputs[-1]
            outputs.append(_cli("check", wrong, "-n", "1", env=env, cwd=tmp_path))
            outputs.append(_cli("check", closed, "-n", "1", env=env, cwd=tmp_path))
            outputs.append(_cli("check", f"ampq://u:{encoded}@h//", env=env, cwd=tmp_path))
            bad_env = {**env, "CONVEYOR_BROKER_URL": wrong, "CONVEYOR_RESULT_BACKEND": wrong}
            outputs.append(
                _cli("-A", "pwtasks", "worker", "-l", "debug", env=bad_env, cwd=tmp_path)
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        outputs.append(log.read_text(errors="replace"))
    finally:
        server.terminate()
        server.wait(10)
    text = "\n".join(outputs)
    assert "conveyor worker" in text  # the banner was printed (with masked URLs)
    assert mask_url(url) in text
    for secret in (PASSWORD, encoded, PASSWORD[:8]):
        assert secret not in text, f"password leaked: ...{text[text.find(secret) - 80 :][:200]}"

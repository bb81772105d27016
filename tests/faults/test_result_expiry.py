"""Every key, row, document and message a result backend writes has an expiry, and expired
results are gone after it (pain point 3.4: Redis OOM from result keys with TTL -1).

For each backend the test writes everything it can write, through the runtime (an app whose
worker runs a succeeding and a failing task, so the worker's ``result_expires`` path is
covered) and directly (three states, a group, a counter, a set), all under a private key
prefix, table set or collection set, with a short ``TTL``. Then it inspects the store itself,
not the backend's API:

* Redis: SCAN the prefix; every key has a PTTL > 0 (none is -1).
* SQL (SQLite, PostgreSQL): every task and group row has ``expires_at``; every counter head
  row has ``expires_at`` (set members live and die with their head row); after the TTL
  ``fetch`` returns None and ``purge_expired`` leaves no row.
* MongoDB: a TTL index (``expireAfterSeconds=0``) on ``expires_at`` in every collection and
  ``expires_at`` on every document; a private server with a 1 s TTL monitor deletes them all.
* memcached: ``mg <key> t`` on every key reports a remaining TTL > 0 (not -1); after the TTL
  the key is a miss.
* rpc:// (RabbitMQ): the reply queue has ``x-expires``; the result message carries an
  ``expiration``; RabbitMQ drops the message when due and deletes the queue once unused.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.faults import (
    AMQP_URL,
    MEMCACHED_URL,
    POSTGRES_URL,
    REDIS_URL,
    record_figures,
    wait_port,
)

from conveyor.core.capabilities import Capability
from conveyor.core.registry import result_backend_from_url
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.runtime import App
from conveyor.testing.support import eventually, service_unavailable, unique_name

with contextlib.suppress(ImportError):  # the MongoDB test's private server (a fixture)
    from support.mongo import private_secantus  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TTL = 2.0
QUEUE_TTL = 15.0  # rpc:// reply queue's x-expires


def _require(port: int, service: str, url: str) -> None:
    try:
        wait_port(port, 2.0)
    except OSError as exc:
        service_unavailable(service, url, exc)


def _write_everything(url: str, options: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Write results through a worker and directly; return (task ids, group ids, keys)."""
    app = App(
        "expiry", broker="memory://", backend=url, result_expires=TTL,
        result_backend_transport_options=options,
    )  # fmt: skip

    @app.task(name="expiry.ok")
    def ok() -> int:
        return 1

    @app.task(name="expiry.fail")
    def fail() -> None:
        raise ValueError("expected")

    worker = app.Worker(pool="threads", concurrency=2, receive_timeout=0.1)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(15.0)
        good, bad = ok.delay(), fail.delay()
        assert good.get(timeout=30) == 1
        with pytest.raises(ValueError):
            bad.get(timeout=30)
        backend = app.backend
        direct = [str(uuid.uuid4()) for _ in range(3)]
        for task_id, state in zip(
            direct, (State.SUCCESS, State.FAILURE, State.STARTED), strict=True
        ):
            value = {"exc_type": "ValueError", "exc_message": ["x"]} if state == "FAILURE" else 2
            backend.store(ResultRecord(task_id=task_id, state=state, result=value), ttl=TTL)
        caps = type(backend).capabilities
        groups: list[str] = []
        keys: list[str] = []
        if Capability.GROUPS in caps:
            gid = str(uuid.uuid4())
            backend.store_group(GroupRecord(group_id=gid, task_ids=tuple(direct)), ttl=TTL)
            groups.append(gid)
        if Capability.COUNTERS in caps:
            counter, members = unique_name("cnt"), unique_name("set")
            backend.incr(counter, ttl=TTL)
            backend.add_member(members, "member-1", ttl=TTL)
            keys += [counter, members]
        return [good.id, bad.id, *direct], groups, keys
    finally:
        worker.stop()
        thread.join(15.0)
        app.close()


# --------------------------------------------------------------------------- redis


def test_redis_every_key_written_has_a_ttl_and_is_gone_after_it() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_unavailable("Redis", REDIS_URL, exc)
    prefix = unique_name("exp") + ":"
    try:
        ids, groups, counters = _write_everything(REDIS_URL, {"global_keyprefix": prefix})
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        assert len(keys) >= len(ids) + len(groups) + len(counters)
        ttls = {k.decode(): client.pttl(k) for k in keys}
        assert all(0 < t <= TTL * 1000 for t in ttls.values()), ttls
        eventually(
            lambda: not list(client.scan_iter(match=f"{prefix}*", count=1000)), TTL + 10,
            message="every key expired",
        )  # fmt: skip
        record_figures(
            "expiry/redis", kind="expiry", backend="redis", written=len(keys), without_ttl=0,
            left_after_ttl=0,
        )  # fmt: skip
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


# --------------------------------------------------------------------------- sql


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_sql_every_row_written_has_expires_at_and_is_gone_after_it(
    dialect: str, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    if dialect == "sqlite":
        plain = f"sqlite:///{tmp_path / 'results.db'}"
    else:
        plain = POSTGRES_URL
        _require(int(plain.rsplit(":", 1)[1].split("/")[0]), "PostgreSQL", plain)
    suffix = uuid.uuid4().hex[:10]
    tables = {
        "task_table": f"exp_task_{suffix}",
        "group_table": f"exp_group_{suffix}",
        "counter_table": f"exp_counter_{suffix}",
    }
    engine = sa.create_engine(plain)
    try:
        ids, groups, keys = _write_everything(f"db+{plain}", dict(tables))
        meta = sa.MetaData()
        task = sa.Table(tables["task_table"], meta, autoload_with=engine)
        group = sa.Table(tables["group_table"], meta, autoload_with=engine)
        counter = sa.Table(tables["counter_table"], meta, autoload_with=engine)
        with engine.connect() as conn:
            tasks = conn.execute(sa.select(task.c.task_id, task.c.expires_at)).all()
            sets = conn.execute(sa.select(group.c.taskset_id, group.c.expires_at)).all()
            heads = conn.execute(
                sa.select(counter.c.counter_key, counter.c.expires_at).where(counter.c.member == "")
            ).all()
            members = conn.execute(
                sa.select(sa.func.count()).select_from(counter).where(counter.c.member != "")
            ).scalar_one()
        assert sorted(r.task_id for r in tasks) == sorted(ids)
        assert sorted(r.taskset_id for r in sets) == sorted(groups)
        assert sorted(r.counter_key for r in heads) == sorted(keys)
        assert all(r.expires_at is not None for r in [*tasks, *sets, *heads])
        backend: Any = result_backend_from_url(f"db+{plain}", **tables)
        purged = 0

        def rows_left() -> int:
            with engine.connect() as conn:
                return sum(
                    conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                    for t in (task, group, counter)
                )

        def purged_all() -> bool:
            nonlocal purged
            purged += backend.purge_expired()
            return rows_left() == 0

        try:
            eventually(
                lambda: not any(backend.fetch_many(ids).values()), TTL + 10,
                message="expired results no longer fetched",
            )  # fmt: skip
            # The counter and set were written last (a little later under load): sweep until
            # every row's expires_at has passed.
            eventually(purged_all, TTL + 10, message="purge_expired removed every row")
        finally:
            backend.close()
        left = rows_left()
        record_figures(
            f"expiry/sql-{dialect}", kind="expiry", backend=f"sql-{dialect}",
            written=len(tasks) + len(sets) + len(heads) + members, without_ttl=0,
            set_member_rows=members, purged=purged, left_after_ttl=left,
        )  # fmt: skip
    finally:
        with engine.begin() as conn:
            for name in tables.values():
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
        engine.dispose()


# --------------------------------------------------------------------------- mongodb


def test_mongodb_every_document_has_expires_at_under_a_ttl_index_and_is_swept(
    private_secantus: str,
) -> None:
    """On a private SecantusDB whose TTL monitor sweeps every second (tests/support/mongo.py);
    a real MongoDB's monitor runs every 60 s."""
    import pymongo

    suffix = uuid.uuid4().hex[:10]
    names = {
        "taskmeta_collection": f"exp_task_{suffix}",
        "groupmeta_collection": f"exp_group_{suffix}",
        "counter_collection": f"exp_counter_{suffix}",
    }
    client: Any = pymongo.MongoClient(private_secantus, serverSelectionTimeoutMS=5000)
    db = client.get_default_database()
    try:
        ids, groups, keys = _write_everything(private_secantus, dict(names))
        docs = 0
        for name in names.values():
            indexes = db[name].index_information().values()
            assert any(
                ix.get("key") == [("expires_at", 1)] and ix.get("expireAfterSeconds") == 0
                for ix in indexes
            ), (name, list(indexes))
            for doc in db[name].find():
                assert doc.get("expires_at") is not None, (name, doc)
                docs += 1
        assert docs >= len(ids) + len(groups) + len(keys)
        eventually(
            lambda: sum(db[n].count_documents({}) for n in names.values()) == 0, TTL + 60,
            interval=0.5, max_interval=1.0, message="the TTL monitor removed every document",
        )  # fmt: skip
        record_figures(
            "expiry/mongodb", kind="expiry", backend="mongodb", written=docs, without_ttl=0,
            left_after_ttl=0,
        )  # fmt: skip
    finally:
        for name in names.values():
            with contextlib.suppress(Exception):
                db.drop_collection(name)
        client.close()


# --------------------------------------------------------------------------- memcached


def _mg_ttl(host: str, port: int, key: str) -> int | None:
    """Remaining TTL of ``key`` by the meta command ``mg <key> t`` (-1: none), None: miss."""
    import socket

    with socket.create_connection((host, port), timeout=2.0) as sock:
        sock.sendall(f"mg {key} t\r\n".encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    line = reply.decode().strip()
    if line.startswith("EN"):
        return None
    assert line.startswith("HD"), line
    flags = {f[0]: f[1:] for f in line.split()[1:]}
    return int(flags["t"])


def test_memcached_every_key_has_an_exptime_and_misses_after_it() -> None:
    host, port = "127.0.0.1", int(MEMCACHED_URL.rsplit(":", 1)[1].split("/")[0])
    _require(port, "memcached", MEMCACHED_URL)
    prefix = unique_name("exp") + "-"
    ids, groups, keys = _write_everything(MEMCACHED_URL, {"global_keyprefix": prefix})
    written = [f"{prefix}celery-task-meta-{i}" for i in ids]
    written += [f"{prefix}celery-taskset-meta-{g}" for g in groups]
    written += [f"{prefix}conveyor-counter-{k}" for k in keys]
    ttls = {k: _mg_ttl(host, port, k) for k in written}
    assert all(t is not None and 0 < t <= TTL + 1 for t in ttls.values()), ttls
    eventually(
        lambda: all(_mg_ttl(host, port, k) is None for k in written), TTL + 10,
        message="every key expired",
    )  # fmt: skip
    record_figures(
        "expiry/memcached", kind="expiry", backend="memcached", written=len(written),
        without_ttl=0, left_after_ttl=0,
    )  # fmt: skip


# --------------------------------------------------------------------------- rpc


def test_rpc_reply_queue_and_result_messages_expire() -> None:
    import pika
    from support.amqp import rabbitmqctl, require_amqp, server_lock

    from conveyor.transports.amqp import parse_amqp_url

    with server_lock():
        require_amqp()
        reply_to = unique_name("exp-reply")
        client: Any = result_backend_from_url(
            "rpc://", broker_url=AMQP_URL, reply_to=reply_to, default_ttl=QUEUE_TTL
        )
        sender: Any = result_backend_from_url("rpc://", broker_url=AMQP_URL, default_ttl=TTL)
        endpoint = parse_amqp_url(AMQP_URL)[0][0]
        conn = pika.BlockingConnection(
            pika.ConnectionParameters(
                host=endpoint.host,
                port=endpoint.port,
                virtual_host=endpoint.vhost,
                credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
            )
        )
        try:
            channel = conn.channel()
            client.declare_reply_queue()
            # The queue's own expiry, x-expires, read with rabbitmqctl (slow under load, so
            # QUEUE_TTL is long; a passive declare would count as use and renew it).
            listed = rabbitmqctl("list_queues", "-q", "name", "arguments").stdout
            line = next((x for x in listed.splitlines() if x.startswith(reply_to)), "")
            assert "x-expires" in line, line
            assert str(int(QUEUE_TTL * 1000)) in line, line
            record = ResultRecord(
                task_id=str(uuid.uuid4()), state=State.SUCCESS, result=1,
                extended={"reply_to": reply_to, "correlation_id": "c-1"},
            )  # fmt: skip
            sender.store(record)
            frame = channel.queue_declare(reply_to, passive=True)
            assert frame.method.message_count == 1
            method, properties, _ = channel.basic_get(reply_to, auto_ack=False)
            assert method is not None
            assert properties.expiration == str(int(TTL * 1000))
            channel.basic_nack(method.delivery_tag, requeue=True)
            eventually(
                lambda: channel.queue_declare(reply_to, passive=True).method.message_count == 0,
                TTL + 10, message="RabbitMQ dropped the expired result",
            )  # fmt: skip
            client.close()
            sender.close()

            def queue_gone() -> bool:
                names = rabbitmqctl("list_queues", "-q", "name").stdout.split()
                return reply_to not in names

            eventually(
                queue_gone, QUEUE_TTL + 40, interval=QUEUE_TTL + 1, max_interval=QUEUE_TTL + 1,
                message="the unused reply queue expired",
            )  # fmt: skip
        finally:
            client.close()
            sender.close()
            conn.close()
    record_figures(
        "expiry/rpc", kind="expiry", backend="rpc", written=1, without_ttl=0, left_after_ttl=0
    )

"""SQLAlchemyBroker specifics the conformance suite does not cover: URLs and options, the
table and its indexes, error translation, deadlock/lock retries, lease bookkeeping.

Runs on every selected database (``tests/support/sql.py``). No database is mocked: deadlocks
and lock waits are produced for real by a second connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import (  # noqa: F401 - sql_target is a fixture
    POSTGRES_URL,
    SqlTarget,
    make_target,
    selected,
    sql_target,
)

from conveyor._drivers.sql import Database, make_database
from conveyor.core.errors import (
    ConfigurationError,
    EncodeError,
    InvalidReceipt,
    InvalidURL,
    MissingDependency,
    OperationalError,
)
from conveyor.core.registry import broker_from_url
from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.sqlalchemy import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    SQLAlchemyBroker,
    SQLAlchemyBrokerOptions,
)


def _env(body: bytes = b"x", **fields: Any) -> Envelope:
    return Envelope(id=fields.pop("id", unique_name("m")), body=body, **fields)


@pytest.fixture
def make(sql_target: SqlTarget) -> Iterator[Callable[..., SQLAlchemyBroker]]:  # noqa: F811
    """``make(**options)``: a broker on the target database; all closed after the test."""
    made: list[SQLAlchemyBroker] = []
    keeper = SQLAlchemyBroker.from_url(f"sqla+{sql_target.url}") if sql_target.memory else None

    def build(**options: Any) -> SQLAlchemyBroker:
        if keeper is not None:
            broker = SQLAlchemyBroker(keeper.engine, SQLAlchemyBrokerOptions(**options))
        else:
            broker = SQLAlchemyBroker.from_url(f"sqla+{sql_target.url}", **options)
        made.append(broker)
        return broker

    yield build
    for broker in reversed(made):
        broker.close()
    if keeper is not None:
        keeper.close()


@pytest.fixture
def queue(make: Callable[..., SQLAlchemyBroker]) -> Iterator[str]:
    name = unique_name("sqlt")
    yield name
    cleaner = make()
    for q in (name, cleaner.dead_letter_queue(name), name + ".dead.dead"):
        cleaner.purge(q)


def _drop(broker: SQLAlchemyBroker, table: str) -> None:
    with broker.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


# ====================================================================== URLs and options
def test_options_in_the_url_query_are_taken_and_removed_before_the_driver(
    tmp_path: Path,
) -> None:
    url = f"sqla+sqlite:///{tmp_path}/q.db?lease_seconds=5&poll_interval=10ms&table_name=jobs"
    broker = SQLAlchemyBroker.from_url(url, max_poll_interval=0.5)
    try:
        assert broker.options.lease_seconds == 5.0
        assert broker.options.poll_interval == pytest.approx(0.01)
        assert broker.options.max_poll_interval == 0.5
        assert broker.options.table_name == "jobs"
        assert dict(broker.engine.url.query) == {}
        broker.declare_queue("q")
        assert sa.inspect(broker.engine).has_table("jobs")
    finally:
        broker.close()


def test_a_keyword_option_beats_the_url_query(tmp_path: Path) -> None:
    broker = SQLAlchemyBroker.from_url(
        f"sqla+sqlite:///{tmp_path}/q.db?lease_seconds=5", lease_seconds=9
    )
    try:
        assert broker.options.lease_seconds == 9.0
    finally:
        broker.close()


def test_an_unknown_keyword_option_fails_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        SQLAlchemyBroker.from_url(f"sqla+sqlite:///{tmp_path}/q.db", lease_secs=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [("lease_seconds", 0), ("poll_interval", -1), ("max_retries", 0), ("table_name", "a;b")],
)
def test_bad_option_values_are_configuration_errors(tmp_path: Path, name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError):
        SQLAlchemyBroker.from_url(f"sqla+sqlite:///{tmp_path}/q.db", **{name: value})


def test_driver_query_parameters_reach_the_driver() -> None:
    if "postgres" not in selected():
        pytest.skip("PostgreSQL not selected")
    name = unique_name("app")
    broker = SQLAlchemyBroker.from_url(
        f"sqla+{POSTGRES_URL}?application_name={name}&lease_seconds=3"
    )
    try:
        with broker.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW application_name").scalar() == name
        assert broker.options.lease_seconds == 3.0
    finally:
        broker.close()


def test_both_schemes_are_registered_and_not_a_bad_url(tmp_path: Path) -> None:
    for scheme in ("sqla", "sqlalchemy"):
        broker = broker_from_url(f"{scheme}+sqlite:///{tmp_path}/r.db")
        try:
            assert isinstance(broker, SQLAlchemyBroker)
        finally:
            broker.close()
    with pytest.raises(InvalidURL):
        SQLAlchemyBroker.from_url("sqla+not a url")


def test_a_missing_driver_says_which_extra_to_install() -> None:
    pytest.importorskip("sqlalchemy.dialects.mysql.mysqldb")
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mysqlclient is installed here")
    with pytest.raises(MissingDependency) as info:
        SQLAlchemyBroker.from_url("sqla+mysql+mysqldb://root@127.0.0.1/test")
    assert "conveyor[mysql]" in str(info.value)


def test_passwords_never_appear_in_repr_or_errors() -> None:
    pytest.importorskip("psycopg")
    url = "sqla+postgresql+psycopg://user:Sup3rS3cret@127.0.0.1:1/db?connect_timeout=2"
    broker = SQLAlchemyBroker.from_url(url)
    try:
        assert "Sup3rS3cret" not in repr(broker)
        assert "***" in repr(broker)
        with pytest.raises(OperationalError) as info:
            broker.publish(_env(), queue="q")
        assert "Sup3rS3cret" not in str(info.value)
    finally:
        broker.close()


# ====================================================================== table and indexes
def test_create_tables_is_idempotent_and_makes_the_claim_and_due_indexes(
    make: Callable[..., SQLAlchemyBroker],
    sql_target: SqlTarget,  # noqa: F811
) -> None:
    table = unique_name("msgs").replace("-", "_")
    broker = make(table_name=table)
    try:
        broker.create_tables()
        broker.create_tables()
        indexes = {ix["name"] for ix in sa.inspect(broker.engine).get_indexes(table)}
        assert {f"ix_{table}_claim", f"ix_{table}_due"} <= indexes
        if sql_target.dialect == "postgresql":
            with broker.engine.connect() as conn:
                definition = conn.exec_driver_sql(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = %s", (f"ix_{table}_claim",)
                ).scalar()
            assert "WHERE (NOT delayed)" in str(definition)  # partial: ready rows only
    finally:
        _drop(broker, table)


def test_several_brokers_creating_the_table_at_once_all_succeed(
    make: Callable[..., SQLAlchemyBroker],
) -> None:
    table = unique_name("race").replace("-", "_")
    brokers = [make(table_name=table) for _ in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(brokers))

    def create(broker: SQLAlchemyBroker) -> None:
        try:
            barrier.wait(10)
            broker.publish(_env(), queue="race")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(b,)) for b in brokers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors, errors
        assert brokers[0].purge("race") == len(brokers)
    finally:
        _drop(brokers[0], table)


def test_without_create_tables_a_missing_table_is_a_configuration_error(
    make: Callable[..., SQLAlchemyBroker],
) -> None:
    broker = make(table_name=unique_name("absent").replace("-", "_"), create_tables=False)
    with pytest.raises(ConfigurationError):
        broker.publish(_env(), queue="q")


# ====================================================================== retries
def test_sqlite_write_lock_held_elsewhere_is_waited_for_not_failed(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    broker = SQLAlchemyBroker.from_url(f"sqla+sqlite:///{path}")
    try:
        broker.declare_queue("q")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        releaser = threading.Timer(0.3, other.execute, ("COMMIT",))
        releaser.start()
        start = time.monotonic()
        broker.publish(_env(), queue="q")
        releaser.join()
        other.close()
        assert time.monotonic() - start >= 0.25
        assert broker.retries > 0
        assert len(broker.receive("q", timeout=1)) == 1
    finally:
        broker.close()


@pytest.mark.parametrize("kind", [k for k in selected() if k in ("postgres", "mysql")])
def test_a_deadlock_is_retried_and_both_transactions_commit(kind: str, tmp_path: Path) -> None:
    # Deadlocks need row locks: PostgreSQL and MariaDB only (SQLite has one write lock).
    target = make_target(kind, tmp_path)
    db: Database = make_database(
        sa.make_url(target.url),
        url_text=target.url,
        settings=SQLAlchemyBrokerOptions().engine_settings(),
        max_retries=5,
    )
    table = unique_name("dl").replace("-", "_")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2)
    attempts = {1: 0, 2: 0}
    errors: list[BaseException] = []

    def crosswise(first: int, second: int) -> Callable[[sa.Connection], None]:
        def work(conn: sa.Connection) -> None:
            attempts[first] += 1
            conn.exec_driver_sql(f"UPDATE {table} SET n = n + 1 WHERE id = {first}")
            if attempts[first] == 1:
                barrier.wait(10)  # both hold their first row: each now wants the other's
            conn.exec_driver_sql(f"UPDATE {table} SET n = n + 1 WHERE id = {second}")

        return work

    def run(first: int, second: int) -> None:
        try:
            db.transaction(crosswise(first, second), what="deadlock test")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in ((1, 2), (2, 1))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert db.retries >= 1
        with db.engine.connect() as conn:
            counts = conn.exec_driver_sql(f"SELECT n FROM {table} ORDER BY id").scalars().all()
        assert counts == [2, 2]  # both transactions applied exactly once
    finally:
        with db.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        db.dispose()


def test_an_unreachable_server_is_connection_lost_quickly(sql_target: SqlTarget) -> None:  # noqa: F811
    broker = SQLAlchemyBroker.from_url(f"sqla+{sql_target.unreachable_url}", connect_timeout=2)
    start = time.monotonic()
    try:
        with pytest.raises(OperationalError):
            broker.publish(_env(), queue="q")
        assert time.monotonic() - start < 10
    finally:
        broker.close()


# ====================================================================== leases and queues
def test_ack_after_the_own_lease_ran_out_but_nobody_took_it_succeeds(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    broker = make(lease_seconds=0.2)
    broker.publish(_env(), queue=queue)
    [got] = broker.receive(queue, timeout=5)
    time.sleep(0.4)  # the lease runs out; no other consumer claims it in between
    broker.extend(got, 5.0)  # still ours: renewable
    broker.ack(got)
    assert broker.receive(queue, timeout=0) == []


def test_another_broker_on_the_same_database_may_settle_a_delivery(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    first, second = make(), make()
    first.publish(_env(), queue=queue)
    [got] = first.receive(queue, timeout=5)
    second.ack(got)
    first.close()  # nothing held any more: nothing to release
    assert second.receive(queue, timeout=0.2) == []


def test_close_releases_only_the_closing_brokers_leases(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    a, b, watcher = make(), make(), make()
    a.publish_many([_env(b"1"), _env(b"2")], queue=queue)
    [held_by_a] = a.receive(queue, timeout=5)
    [held_by_b] = b.receive(queue, timeout=5)
    a.close()
    [again] = watcher.receive(queue, timeout=5)
    assert again.envelope.id == held_by_a.envelope.id
    assert again.redelivered
    assert watcher.receive(queue, timeout=0.2) == []  # b's message is still held
    b.ack(held_by_b)
    watcher.ack(again)


def test_dead_letters_carry_reason_and_source_and_can_be_dead_lettered_again(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    broker = make()
    sent = _env(b"poison", headers={"task": "t"})
    broker.publish(sent, queue=queue)
    [got] = broker.receive(queue, timeout=5)
    assert got.delivery_count == 1
    broker.reject(got, requeue=True)
    [again] = broker.receive(queue, timeout=5)
    assert (again.redelivered, again.delivery_count) == (True, 2)
    broker.reject(again, requeue=False, reason="ValueError: boom")
    dead_queue = broker.dead_letter_queue(queue)
    assert broker.size(dead_queue) == 1
    [dead] = broker.receive(dead_queue, timeout=5)
    assert dead.envelope.headers[DEAD_LETTER_REASON_HEADER] == "ValueError: boom"
    assert dead.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
    assert dead.envelope.headers["task"] == "t"
    assert (dead.redelivered, dead.delivery_count) == (False, 1)
    broker.reject(dead, requeue=False, reason="still bad")
    [twice] = broker.receive(broker.dead_letter_queue(dead_queue), timeout=5)
    assert twice.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == dead_queue
    broker.ack(twice)


def test_a_lost_lease_makes_reject_raise_invalid_receipt(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    slow, other = make(lease_seconds=0.3), make()
    slow.publish(_env(), queue=queue)
    [first] = slow.receive(queue, timeout=5)
    [second] = eventually(lambda: other.receive(queue, timeout=0.2), 10)
    with pytest.raises(InvalidReceipt):
        slow.reject(first, requeue=True)
    slow.reject(first, requeue=True)  # a repeat is a no-op
    other.ack(second)


def test_several_queues_order_by_priority_then_queue_order(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    # A table of its own: under SKIP LOCKED a row that another test's statement has locked
    # for a moment is skipped, which would reorder this batch (MariaDB, busy shared table).
    table = unique_name("order").replace("-", "_")
    broker = make(table_name=table)
    try:
        other = queue + "-b"
        broker.publish(_env(b"b-low"), queue=other)
        broker.publish(_env(b"a-low"), queue=queue)
        broker.publish(_env(b"b-high", priority=5), queue=other)
        got = broker.receive([queue, other], max_messages=3, timeout=5)
        assert [d.envelope.body for d in got] == [b"b-high", b"a-low", b"b-low"]
        for delivery in got:
            broker.ack(delivery)
    finally:
        _drop(broker, table)


def test_a_batch_with_unencodable_headers_publishes_nothing(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    broker = make()
    with pytest.raises(EncodeError):
        broker.publish_many([_env(), _env(headers={"bad": object()})], queue=queue)
    assert broker.size(queue) == 0


def test_dead_letter_names_may_exceed_the_user_queue_name_limit(
    make: Callable[..., SQLAlchemyBroker],
) -> None:
    broker = make()
    name = "q" * 200
    assert broker.receive(broker.dead_letter_queue(name), timeout=0) == []
    with pytest.raises(ConfigurationError):
        broker.receive("q" * 201, timeout=0)


def test_delayed_rows_are_promoted_only_when_due(
    make: Callable[..., SQLAlchemyBroker], queue: str
) -> None:
    broker = make(promote_interval=0.0)
    broker.publish(_env(b"later"), queue=queue, delay=0.5)
    table = sa.table("conveyor_message", sa.column("queue"), sa.column("delayed"))

    def delayed_rows() -> list[Any]:
        with broker.engine.connect() as conn:
            stmt = sa.select(table.c.delayed).where(table.c.queue == queue)
            return list(conn.execute(stmt).scalars())

    assert broker.receive(queue, timeout=0) == []
    assert [bool(v) for v in delayed_rows()] == [True]  # receive did not promote it early
    [got] = broker.receive(queue, timeout=5)
    assert got.envelope.body == b"later"
    broker.ack(got)


# ====================================================================== waking consumers
@pytest.mark.parametrize("notify", [True, False], ids=["notify", "polling-only"])
def test_a_publish_wakes_an_idle_postgres_consumer_at_once(notify: bool, tmp_path: Path) -> None:
    if "postgres" not in selected():
        pytest.skip("PostgreSQL not selected")
    target = make_target("postgres", tmp_path)
    url = f"sqla+{target.url}"
    # Polling alone would look again only after 2 s.
    consumer = SQLAlchemyBroker.from_url(
        url, poll_interval=2.0, max_poll_interval=2.0, notify=notify
    )
    producer = SQLAlchemyBroker.from_url(url)
    queue = unique_name("wake")
    try:
        producer.declare_queue(queue)
        timer = threading.Timer(0.5, producer.publish, (_env(b"wake up"),), {"queue": queue})
        start = time.monotonic()
        timer.start()
        got = consumer.receive(queue, timeout=10)
        elapsed = time.monotonic() - start
        timer.join()
        assert [d.envelope.body for d in got] == [b"wake up"]
        if notify:
            assert elapsed < 1.9, f"LISTEN/NOTIFY did not wake the consumer ({elapsed:.2f} s)"
        else:
            assert elapsed >= 1.9, f"woken after {elapsed:.2f} s without notifications"
        consumer.ack(got[0])
    finally:
        consumer.close()
        producer.close()


def test_idle_sqlite_polls_do_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "idle.db"
    broker = SQLAlchemyBroker.from_url(f"sqla+sqlite:///{path}", promote_interval=30.0)
    try:
        queue = unique_name("idle")
        assert broker.receive(queue, timeout=0) == []  # claims once: promotion done too
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # a writer holding the lock for 2 s
        releaser = threading.Timer(2.0, other.execute, ("COMMIT",))
        releaser.start()
        try:
            start = time.monotonic()
            assert broker.receive(queue, timeout=0.5) == []
            # Idle polls only read (WAL readers never wait for the writer): back on time.
            assert time.monotonic() - start < 1.5
        finally:
            releaser.join()
            other.close()
    finally:
        broker.close()

"""SQLAlchemyResultBackend specifics beyond the conformance suite: Celery's table layout and
byte encoding, our expiry column, batched sweeping, legacy rows, options, races.

Runs on every selected database (``tests/support/sql.py``); nothing is mocked.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import SqlTarget, sql_target  # noqa: F401 - fixture

from conveyor.backends.sqlalchemy import (
    SQLAlchemyResultBackend,
    SQLAlchemyResultBackendOptions,
)
from conveyor.core.errors import ConfigurationError, DecodeError
from conveyor.core.registry import result_backend_from_url
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

UTC = timezone.utc
# Celery 5.7's celery_taskmeta with result_extended (5.7 always creates these) and tasksetmeta.
CELERY_TASK_COLUMNS = {
    "id", "task_id", "status", "result", "date_done", "traceback", "children",
    "name", "args", "kwargs", "worker", "retries", "queue", "stamps",
}  # fmt: skip
CELERY_GROUP_COLUMNS = {"id", "taskset_id", "result", "date_done"}


@pytest.fixture
def make(sql_target: SqlTarget) -> Iterator[Callable[..., SQLAlchemyResultBackend]]:  # noqa: F811
    made: list[SQLAlchemyResultBackend] = []
    url = f"db+{sql_target.url}"
    keeper = SQLAlchemyResultBackend.from_url(url) if sql_target.memory else None

    def build(**options: Any) -> SQLAlchemyResultBackend:
        if keeper is not None:
            opts = SQLAlchemyResultBackendOptions(**options)
            backend = SQLAlchemyResultBackend(keeper.engine, opts)
        else:
            backend = SQLAlchemyResultBackend.from_url(url, **options)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()
    if keeper is not None:
        keeper.close()


def _tables(backend: SQLAlchemyResultBackend) -> dict[str, str]:
    suffix = unique_name("t").replace("-", "_")
    return {
        "task_table": f"tm_{suffix}",
        "group_table": f"gm_{suffix}",
        "counter_table": f"ct_{suffix}",
    }


def _drop(backend: SQLAlchemyResultBackend, *tables: str) -> None:
    with backend.engine.begin() as conn:
        for table in tables:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def private(make: Callable[..., SQLAlchemyResultBackend]) -> Iterator[SQLAlchemyResultBackend]:
    """A backend on tables of its own (dropped after), for tests that count rows."""
    names = _tables(make())
    backend = make(**names)
    yield backend
    _drop(backend, *names.values())


def _raw(backend: SQLAlchemyResultBackend, table: str, task_id: str) -> Any:
    with backend.engine.connect() as conn:
        return conn.execute(
            sa.text(f"SELECT * FROM {table} WHERE task_id = :t"), {"t": task_id}
        ).first()


# ====================================================================== layout and encoding
def test_the_tables_have_celerys_columns_plus_ours_and_the_indexes(
    private: SQLAlchemyResultBackend,
    sql_target: SqlTarget,  # noqa: F811
) -> None:
    private.create_tables()
    opts = private.options
    inspector = sa.inspect(private.engine)
    task_columns = {c["name"] for c in inspector.get_columns(opts.task_table)}
    assert task_columns == CELERY_TASK_COLUMNS | {"expires_at", "group_id", "parent_id"}
    group_columns = {c["name"] for c in inspector.get_columns(opts.group_table)}
    assert group_columns == CELERY_GROUP_COLUMNS | {"expires_at"}
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes(opts.task_table)}
    assert {("date_done",), ("expires_at",)} <= indexed
    uniques = inspector.get_unique_constraints(opts.task_table)
    assert ["task_id"] in [u["column_names"] for u in uniques] or any(
        ix["unique"] and ix["column_names"] == ["task_id"]
        for ix in inspector.get_indexes(opts.task_table)
    )
    if sql_target.dialect == "postgresql":
        with private.engine.connect() as conn:
            sequences = set(
                conn.execute(sa.text("SELECT relname FROM pg_class WHERE relkind = 'S'")).scalars()
            )
        assert {"task_id_sequence", "taskset_id_sequence"} <= sequences


def test_the_result_column_holds_the_serializer_bytes_celery_57_writes(
    private: SQLAlchemyResultBackend,
) -> None:
    from kombu.utils.json import dumps

    task_id = unique_name("bytes")
    value = {"b": [1, 2.5, None], "a": "ü"}
    private.store(
        ResultRecord(
            task_id,
            State.SUCCESS,
            value,
            children=[[["c1", None], None]],
            date_done=datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            extended={"name": "t.add", "args": [1], "kwargs": {"k": 2}, "retries": 1},
        ),
        ttl=600.0,
    )
    row = _raw(private, private.options.task_table, task_id)._mapping
    assert bytes(row["result"]) == dumps(value).encode()
    assert bytes(row["children"]) == dumps([[["c1", None], None]]).encode()
    assert bytes(row["args"]) == b"[1]"
    assert row["name"] == "t.add"
    assert row["status"] == "SUCCESS"
    done = row["date_done"]
    if isinstance(done, str):  # raw SQLite text
        done = datetime.fromisoformat(done)
    assert done == datetime(2024, 1, 2, 3, 4, 5, 678901)  # naive UTC, microseconds kept
    expires = row["expires_at"]
    if isinstance(expires, str):
        expires = datetime.fromisoformat(expires)
    now = datetime.now(UTC).replace(tzinfo=None)
    assert now + timedelta(seconds=590) < expires < now + timedelta(seconds=610)


def test_a_missing_children_list_is_stored_as_null_like_celery(
    private: SQLAlchemyResultBackend,
) -> None:
    task_id = unique_name("nochildren")
    private.store(ResultRecord(task_id, State.STARTED, {"pid": 1}))
    row = _raw(private, private.options.task_table, task_id)._mapping
    assert row["children"] is None
    assert row["date_done"] is None


# ====================================================================== expiry
def test_purge_expired_deletes_in_batches_and_counts_every_table(
    private: SQLAlchemyResultBackend,
) -> None:
    from conveyor.core.types import GroupRecord

    for i in range(25):
        private.store(ResultRecord(unique_name(f"e{i}"), State.SUCCESS, i), ttl=0.001)
    keeper = unique_name("keep")
    private.store(ResultRecord(keeper, State.SUCCESS, "k"), ttl=600.0)
    private.store_group(GroupRecord(unique_name("g"), ("a", "b")), ttl=0.001)
    private.incr(unique_name("c"), ttl=0.001)
    private.add_member(unique_name("s"), "m1", ttl=0.001)
    import time

    time.sleep(0.05)
    # 25 results + 1 group + 1 counter head + a set head and its member.
    assert private.purge_expired(batch_size=10) == 25 + 1 + 1 + 2
    assert private.purge_expired(batch_size=10) == 0
    assert private.fetch(keeper) is not None


def test_rows_without_expires_at_expire_by_date_done_and_default_ttl(
    private: SQLAlchemyResultBackend, make: Callable[..., SQLAlchemyResultBackend]
) -> None:
    opts = private.options
    short = make(
        task_table=opts.task_table,
        group_table=opts.group_table,
        counter_table=opts.counter_table,
        default_ttl=60.0,
    )
    old, recent, pending = unique_name("old"), unique_name("recent"), unique_name("pending")
    for task_id in (old, recent, pending):
        short.store(ResultRecord(task_id, State.SUCCESS if task_id != pending else State.STARTED))
    table = sa.table(
        opts.task_table,
        sa.column("task_id"),
        sa.column("expires_at"),
        sa.column("date_done"),
    )
    two_minutes_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=2)
    with short.engine.begin() as conn:  # rows as Celery writes them: no expires_at
        conn.execute(sa.update(table).values(expires_at=None))
        conn.execute(
            sa.update(table).where(table.c.task_id == old).values(date_done=two_minutes_ago)
        )
    assert short.fetch(old) is None
    assert short.fetch(recent) is not None
    assert short.fetch(pending) is not None  # non-ready Celery rows never expire, as in Celery
    assert short.purge_expired() == 1


# ====================================================================== legacy and foreign rows
def test_a_pickled_pre_57_row_is_refused_unless_pickle_is_accepted(
    private: SQLAlchemyResultBackend, make: Callable[..., SQLAlchemyResultBackend]
) -> None:
    task_id = unique_name("legacy")
    private.store(ResultRecord(task_id, State.SUCCESS, "placeholder"))
    table = sa.table(private.options.task_table, sa.column("task_id"), sa.column("result"))
    with private.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.task_id == task_id)
            .values(result=pickle.dumps({"old": (1, 2)}, protocol=4))
        )
    with pytest.raises(DecodeError):
        private.fetch(task_id)
    opts = private.options
    trusting = make(
        task_table=opts.task_table,
        group_table=opts.group_table,
        counter_table=opts.counter_table,
        accept=("json", "pickle"),
    )
    assert trusting.fetch(task_id).result == {"old": (1, 2)}  # type: ignore[union-attr]


def test_a_celery_56_table_without_the_newer_columns_is_used_as_it_is(
    make: Callable[..., SQLAlchemyResultBackend],
) -> None:
    names = _tables(make())
    first = make(**names)
    task = names["task_table"]
    postgres = first.engine.dialect.name == "postgresql"
    blob, when = ("BYTEA", "TIMESTAMP") if postgres else ("BLOB", "DATETIME")
    auto = " AUTO_INCREMENT" if first.engine.dialect.name == "mysql" else ""
    with first.engine.begin() as conn:  # what Celery <= 5.6 created without result_extended
        if postgres:  # Celery's ids come from this named sequence on PostgreSQL
            conn.exec_driver_sql("CREATE SEQUENCE IF NOT EXISTS task_id_sequence")
        conn.exec_driver_sql(
            f"CREATE TABLE {task} (id INTEGER NOT NULL{auto} PRIMARY KEY, "
            f"task_id VARCHAR(155) UNIQUE, status VARCHAR(50), result {blob}, "
            f"date_done {when}, traceback TEXT)"
        )
    try:
        backend = make(**names)
        task_id = unique_name("old-layout")
        record = ResultRecord(
            task_id, State.SUCCESS, [1], children=[], extended={"name": "dropped"}
        )
        backend.store(record)
        got = backend.fetch(task_id)
        assert got is not None
        assert got.result == [1]
        assert dict(got.extended) == {}  # no such columns: not stored, no error
        columns = {c["name"] for c in sa.inspect(backend.engine).get_columns(task)}
        assert {"expires_at", "group_id", "parent_id"} <= columns
        assert "children" not in columns
    finally:
        _drop(first, *names.values())


# ====================================================================== options, races
def test_url_options_are_parsed_and_driver_keys_pass_through(tmp_path: Path) -> None:
    backend = result_backend_from_url(
        f"db+sqlite:///{tmp_path}/r.db?default_ttl=60&task_table=results"
    )
    try:
        assert isinstance(backend, SQLAlchemyResultBackend)
        assert backend.default_ttl == 60.0
        assert backend.options.task_table == "results"
        assert dict(backend.engine.url.query) == {}
    finally:
        backend.close()
    with pytest.raises(ConfigurationError, match="default_ttl"):
        SQLAlchemyResultBackend.from_url(f"db+sqlite:///{tmp_path}/r.db", default_tll=1)


def test_without_create_tables_a_missing_table_is_a_configuration_error(
    make: Callable[..., SQLAlchemyResultBackend],
) -> None:
    backend = make(**_tables(make()), create_tables=False)
    with pytest.raises(ConfigurationError):
        backend.store(ResultRecord(unique_name("t"), State.SUCCESS, 1))


def test_racing_writers_never_replace_a_stored_success(
    make: Callable[..., SQLAlchemyResultBackend],
) -> None:
    clients = [make(), make()]
    task_id = unique_name("race")
    clients[0].store(ResultRecord(task_id, State.STARTED, None))
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def write(n: int) -> None:
        try:
            barrier.wait(10)
            for i in range(20):
                state = State.SUCCESS if (n, i) == (0, 0) else State.FAILURE
                result = (
                    "winner" if state is State.SUCCESS else {"exc_type": "E", "exc_message": []}
                )
                clients[n % 2].store(ResultRecord(task_id, state, result))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    got = clients[1].fetch(task_id)
    assert got is not None
    assert (got.state, got.result) == (State.SUCCESS, "winner")

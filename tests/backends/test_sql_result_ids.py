"""The SQL result backend against hostile ids, a closed client, values its columns cannot
hold, collations that confuse ids (MariaDB/MySQL), and secrets (issue 13).

Runs on every database ``CONVEYOR_TEST_SQL`` selects (tox envs ``sqla-*``). Checks shared
with the other backends live in ``hostileids.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from support.hostileids import (
    NOT_STRINGS,
    ODD_IDS,
    assert_closed_backend_raises_connection_lost,
    assert_lookalikes_never_meet,
    assert_odd_id_is_exact_or_refused,
    assert_refused_everywhere,
    assert_unencodable_result_is_an_encode_error,
    odd_id,
)
from support.sql import SqlTarget, make_target, selected, sql_target  # noqa: F401

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    OperationalError,
)
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import unique_name

SECRET = "s3cr3t-sql-pw"
UTC = timezone.utc


def _names() -> dict[str, str]:
    suffix = unique_name("i").replace("-", "_")
    return {
        "task_table": f"idt_{suffix}",
        "group_table": f"idg_{suffix}",
        "counter_table": f"idc_{suffix}",
    }


@pytest.fixture
def make(sql_target: SqlTarget) -> Iterator[Callable[..., SQLAlchemyResultBackend]]:  # noqa: F811
    """Backends on tables of this test's own (dropped after)."""
    made: list[SQLAlchemyResultBackend] = []
    names = _names()

    def build(**options: Any) -> SQLAlchemyResultBackend:
        backend = SQLAlchemyResultBackend.from_url(f"db+{sql_target.url}", **{**names, **options})
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()
    if not sql_target.memory:
        engine = sa.create_engine(sql_target.url)
        try:
            with engine.begin() as conn:
                for table in names.values():
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        finally:
            engine.dispose()


@pytest.fixture
def backend(make: Callable[..., SQLAlchemyResultBackend]) -> SQLAlchemyResultBackend:
    b = make()
    b.create_tables()
    return b


def _count_statements(backend: SQLAlchemyResultBackend) -> list[str]:
    seen: list[str] = []
    sa.event.listen(
        backend.engine, "before_cursor_execute", lambda *args: seen.append(str(args[2]))
    )
    return seen


def _success(task_id: str, **fields: Any) -> ResultRecord:
    return ResultRecord(
        task_id, State.SUCCESS, "ok", date_done=datetime.now(UTC), children=[], **fields
    )


# ================================================================== ids that are not strings
@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_ids_that_are_not_strings_are_refused_everywhere_and_run_no_statement(
    backend: SQLAlchemyResultBackend, bad: Any
) -> None:
    statements = _count_statements(backend)
    assert_refused_everywhere(backend, bad)
    assert statements == []


def test_an_int_id_no_longer_matches_a_row_whose_id_starts_with_its_digits(
    backend: SQLAlchemyResultBackend,
) -> None:
    # MySQL compared task_id = 5 as numbers: '5abc...' matched and was returned.
    task_id = "5" + unique_name("digits")
    backend.store(_success(task_id), ttl=60)
    with pytest.raises(ConfigurationError):
        backend.fetch(5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        backend.forget(5)  # type: ignore[arg-type]
    assert backend.fetch(task_id) is not None


def test_ids_that_are_not_strings_never_reach_the_database(sql_target: SqlTarget) -> None:  # noqa: F811
    backend = SQLAlchemyResultBackend.from_url(f"db+{sql_target.unreachable_url}")
    try:
        for bad in NOT_STRINGS[:4]:
            assert_refused_everywhere(backend, bad)
        with pytest.raises(OperationalError):
            backend.fetch("a-proper-id")  # the control: a real id does reach the database
    finally:
        backend.close()


# ================================================================== odd strings
@pytest.mark.parametrize("name", list(ODD_IDS))
def test_an_odd_id_is_stored_exactly_or_refused_everywhere(
    backend: SQLAlchemyResultBackend,
    sql_target: SqlTarget,  # noqa: F811
    name: str,
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    refused = {"NUL", "lone surrogate", "escaped surrogate", "10,000 characters"}
    refused |= {"1025 UTF-8 bytes", "255 characters", "156 characters"}
    if sql_target.dialect == "mysql":
        refused.add("trailing space")
    assert stored is (name not in refused)


def test_an_id_over_155_characters_is_refused_with_the_reason(
    backend: SQLAlchemyResultBackend,
) -> None:
    with pytest.raises(ConfigurationError, match="String\\(155\\)"):
        backend.validate_task_id("x" * 156)
    for field in ("group_id", "parent_id"):
        with pytest.raises(ConfigurationError, match=field.replace("_", " ")):
            backend.store(_success(unique_name("t"), **{field: "g" * 156}), ttl=60)
    backend.validate_task_id("x" * 155)


def test_lookalike_ids_never_read_or_delete_each_other(backend: SQLAlchemyResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


# ================================================================== MariaDB/MySQL collations
@pytest.mark.skipif("mysql" not in selected(), reason="MariaDB/MySQL is not selected")
def test_a_table_created_here_keeps_ids_that_differ_only_in_case_or_accents_apart() -> None:
    target = make_target("mysql", _unused_path())
    names = _names()
    backend = SQLAlchemyResultBackend.from_url(f"db+{target.url}", **names)
    try:
        for first, second in (("abc", "ABC"), ("e", "é"), ("ss", "ß")):
            u = unique_name("case")
            backend.store(_success(f"{first}-{u}"), ttl=60)
            backend.store(ResultRecord(f"{second}-{u}", State.FAILURE, {"exc_type": "X"}), ttl=60)
            a, b = backend.fetch(f"{first}-{u}"), backend.fetch(f"{second}-{u}")
            assert a is not None
            assert b is not None
            assert (a.state, b.state) == (State.SUCCESS, State.FAILURE)
        assert backend.add_member(u, "A", ttl=60) == 1
        assert backend.add_member(u, "a", ttl=60) == 2
    finally:
        backend.close()
        _drop(target.url, *names.values())


@pytest.mark.skipif("mysql" not in selected(), reason="MariaDB/MySQL is not selected")
def test_a_case_insensitive_celery_table_refuses_a_colliding_store_and_never_mixes_ids() -> None:
    target = make_target("mysql", _unused_path())
    names = _names()
    creator = SQLAlchemyResultBackend.from_url(f"db+{target.url}", **names)
    creator.create_tables()
    creator.close()
    engine = sa.create_engine(target.url)
    try:
        with engine.begin() as conn:  # as Celery (or an older conveyor) creates them
            for table, column, width in (
                (names["task_table"], "task_id", 155),
                (names["group_table"], "taskset_id", 155),
                (names["counter_table"], "counter_key", 255),
                (names["counter_table"], "member", 255),
            ):
                conn.exec_driver_sql(
                    f"ALTER TABLE {table} MODIFY {column} VARCHAR({width}) "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
                    + (" NOT NULL" if table == names["counter_table"] else "")
                )
        backend = SQLAlchemyResultBackend.from_url(f"db+{target.url}", **names)
        try:
            u = unique_name("victim")
            victim, attacker = f"victim-{u}", f"VICTIM-{u}".upper()
            backend.store(_success(victim), ttl=60)
            assert backend.fetch(attacker) is None
            assert backend.fetch_many([attacker]) == {}
            with pytest.raises(ConfigurationError, match="COLLATE utf8mb4_bin"):
                backend.store(ResultRecord(attacker, State.STARTED), ttl=60)
            backend.forget(attacker)
            kept = backend.fetch(victim)
            assert kept is not None
            assert (kept.task_id, kept.state, kept.result) == (victim, State.SUCCESS, "ok")
            # Not a SUCCESS: the refused store still leaves the victim's row alone.
            other = f"other-{u}"
            backend.store(ResultRecord(other, State.STARTED), ttl=60)
            with pytest.raises(ConfigurationError):
                backend.store(_success(other.upper()), ttl=60)
            still = backend.fetch(other)
            assert still is not None
            assert still.state is State.STARTED
            backend.store_group(GroupRecord(f"g-{u}", (victim,)), ttl=60)
            with pytest.raises(ConfigurationError):
                backend.store_group(GroupRecord(f"G-{u}".upper(), (attacker,)), ttl=60)
            group = backend.fetch_group(f"g-{u}")
            assert group is not None
            assert group.task_ids == (victim,)
            # conveyor's own counter table was made exact when the backend started.
            assert backend.add_member(f"k-{u}", "A", ttl=60) == 1
            assert backend.add_member(f"k-{u}", "a", ttl=60) == 2
        finally:
            backend.close()
    finally:
        engine.dispose()
        _drop(target.url, *names.values())


def _unused_path() -> Any:
    from pathlib import Path

    return Path("/nonexistent-sqlite-dir")  # only SQLite targets use the path


def _drop(url: str, *tables: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for table in tables:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    finally:
        engine.dispose()


# ================================================================== closed, values, errors
def test_a_closed_backend_raises_connection_lost_everywhere(
    make: Callable[..., SQLAlchemyResultBackend],
) -> None:
    assert_closed_backend_raises_connection_lost(make())


def test_a_result_that_cannot_be_encoded_is_an_encode_error(
    backend: SQLAlchemyResultBackend,
) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


def test_a_stored_result_that_cannot_be_decoded_is_a_decode_error(
    backend: SQLAlchemyResultBackend,
) -> None:
    task_id = unique_name("garbage")
    backend.store(_success(task_id), ttl=60)
    t = sa.table("x", sa.column("task_id"), sa.column("result"))
    t.name = backend.options.task_table
    with backend.engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.task_id == task_id).values(result=b"\xff not json"))
    with pytest.raises(DecodeError):
        backend.fetch(task_id)
    with pytest.raises(DecodeError):
        backend.fetch_many([task_id])


def test_text_no_column_can_hold_is_escaped_and_informational_columns_are_cut(
    backend: SQLAlchemyResultBackend,
) -> None:
    task_id = unique_name("text")
    long_name = "n" * 300
    record = ResultRecord(
        task_id,
        State.FAILURE,
        {"exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"},
        traceback="line\x00with NUL and a lone \udcff surrogate",
        date_done=datetime.now(UTC),
        extended={"name": long_name, "worker": "w\x00" * 100, "queue": "q" * 200, "retries": 2},
    )
    backend.store(record, ttl=60)
    got = backend.fetch(task_id)
    assert got is not None
    assert got.traceback == "line\\x00with NUL and a lone \\udcff surrogate"
    assert got.extended["name"] == long_name[:155]
    assert got.extended["queue"] == "q" * 155
    assert len(got.extended["worker"]) == 155
    assert got.extended["retries"] == 2


def test_values_a_column_cannot_hold_are_refused_not_retried(
    backend: SQLAlchemyResultBackend,
) -> None:
    for retries in (2**40, "3", 1.5):
        with pytest.raises(EncodeError, match="retries"):
            backend.store(_success(unique_name("r"), extended={"retries": retries}), ttl=60)
    with pytest.raises(ConfigurationError, match="64-bit"):
        backend.incr(unique_name("c"), 2**63, ttl=60)
    # A ttl past the year 9999 means "never expires", not an overflow.
    task_id = unique_name("forever")
    backend.store(_success(task_id), ttl=1e12)
    assert backend.fetch(task_id) is not None


# ================================================================== secrets
@pytest.mark.parametrize("kind", [k for k in selected() if k != "sqlite"])
def test_no_password_shows_in_errors_or_reprs(kind: str) -> None:
    target = make_target(kind, _unused_path())
    url = sa.make_url(target.unreachable_url).set(username="user", password=SECRET)
    text = url.render_as_string(hide_password=False)
    assert SECRET in text
    backend = SQLAlchemyResultBackend.from_url(f"db+{text}", connect_timeout=2)
    try:
        with pytest.raises(OperationalError) as info:
            backend.fetch("some-task")
        for shown in (str(info.value), repr(backend), repr(backend.options)):
            assert SECRET not in shown
    finally:
        backend.close()

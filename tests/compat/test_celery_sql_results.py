"""Real Celery 5.7 and conveyor share one SQL result store (``db+<url>``), both directions.

The scenarios every store shares (Celery writes / a real Celery worker runs, result_extended
on / conveyor writes, SUCCESS is final either way) are
:class:`result_compat.CeleryResultCompat`'s, run here once per database; this file adds what
is SQL's own:

* Celery rows expire for conveyor by ``date_done`` + ``default_ttl`` like Celery's own
  cleanup, and ``purge_expired`` removes them for Celery too.
* Tables created by either side are used by the other (conveyor adds its columns to
  Celery's table).

Databases: SQLite files always, PostgreSQL and MariaDB as selected by ``CONVEYOR_TEST_SQL``
(``tests/support/sql.py``). Skips when Celery or SQLAlchemy is not installed.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa
from celery import Celery
from celery.result import AsyncResult
from result_compat import UTC, CeleryResultCompat, celery_app
from support.sql import SqlTarget, make_target, selected

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

KINDS = [k for k in selected() if k in ("sqlite", "postgres", "mysql")]


def _columns(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[1] for row in db.execute("PRAGMA table_info(celery_taskmeta)")}


class TestCelerySqlResults(CeleryResultCompat):
    backend_class = SQLAlchemyResultBackend
    celery_stores_children = False  # celery_taskmeta has no children column

    @pytest.fixture(params=KINDS)
    def target(self, request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
        return make_target(request.param, tmp_path)

    @pytest.fixture
    def result_url(self, target: SqlTarget) -> str:
        return f"db+{target.url}"

    def test_celery_rows_expire_for_conveyor_by_date_done_like_celery_cleanup(
        self, app: Celery, target: SqlTarget
    ) -> None:
        backend = SQLAlchemyResultBackend.from_url(f"db+{target.url}", default_ttl=3600.0)
        try:
            old, fresh = unique_name("old"), unique_name("fresh")
            app.backend.store_result(old, "old", "SUCCESS")
            app.backend.store_result(fresh, "fresh", "SUCCESS")
            assert backend.fetch(old) is not None  # make sure our columns exist before poking
            two_hours_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=2)
            table = sa.table("celery_taskmeta", sa.column("task_id"), sa.column("date_done"))
            with backend.engine.begin() as conn:
                conn.execute(
                    sa.update(table).where(table.c.task_id == old).values(date_done=two_hours_ago)
                )
            assert backend.fetch(old) is None
            assert backend.fetch(fresh) is not None
            assert backend.purge_expired(batch_size=100) >= 1
            assert AsyncResult(old, app=app).state == "PENDING"
            assert AsyncResult(fresh, app=app).get(timeout=5) == "fresh"
        finally:
            backend.close()

    def test_tables_created_by_celery_are_adopted_by_conveyor(self, tmp_path: Path) -> None:
        path = tmp_path / "celery-first.db"
        app = celery_app(f"db+sqlite:///{path}")
        task_id = unique_name("celery-made")
        app.backend.store_result(task_id, [1, 2], "SUCCESS")
        assert "expires_at" not in _columns(path)
        ours = SQLAlchemyResultBackend.from_url(f"db+sqlite:///{path}")
        try:
            assert ours.fetch(task_id).result == [1, 2]  # type: ignore[union-attr]
            assert {"expires_at", "group_id", "parent_id"} <= _columns(path)
            mine = unique_name("ours")
            ours.store(ResultRecord(mine, State.SUCCESS, "x"), ttl=60.0)
            assert AsyncResult(mine, app=app).get(timeout=5) == "x"
        finally:
            ours.close()
            app.close()

    def test_tables_created_by_conveyor_are_used_by_celery(self, tmp_path: Path) -> None:
        path = tmp_path / "conveyor-first.db"
        ours = SQLAlchemyResultBackend.from_url(f"db+sqlite:///{path}")
        app = celery_app(f"db+sqlite:///{path}")
        try:
            mine = unique_name("ours")
            ours.store(ResultRecord(mine, State.SUCCESS, {"k": "v"}))
            assert AsyncResult(mine, app=app).get(timeout=5) == {"k": "v"}
            theirs = unique_name("celery")
            app.backend.store_result(theirs, 7, "SUCCESS")
            got: Any = ours.fetch(theirs)
            assert (got.state, got.result) == (State.SUCCESS, 7)
        finally:
            ours.close()
            app.close()

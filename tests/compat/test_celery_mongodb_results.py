"""Real Celery 5.7 and conveyor share one MongoDB result store, in both directions.

The scenarios every store shares (Celery writes / a real Celery worker runs / conveyor
writes, SUCCESS is final either way; Celery 5.7's filter ``{_id, status != SUCCESS}`` and
ours) are :class:`result_compat.CeleryResultCompat`'s, run here on MongoDB; this file adds
what is MongoDB's own:

* Celery's ``result_extended`` fields (with ``group_id``/``parent_id``) are read by conveyor,
  and conveyor's children and extended fields by ``AsyncResult``.
* Celery's documents expire for conveyor by ``date_done`` + ``default_ttl`` like Celery's own
  cleanup.
* conveyor's documents have Celery's fields and BSON types.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/support/mongo.py``); both sides use its
database (Celery takes it from the URL path too). Skips without Celery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.app.task import Context
from celery.result import AsyncResult
from pymongo import MongoClient
from result_compat import TIMEOUT, UTC, CeleryResultCompat, celery_app
from support.mongo import mongodb_url  # noqa: F401 - fixture

from conveyor.backends.mongodb import MongoDBResultBackend
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import eventually, unique_name


class TestCeleryMongoDBResults(CeleryResultCompat):
    backend_class = MongoDBResultBackend
    # Celery's MongoDB backend keeps only member ids, so its restore gives back the list of
    # AsyncResults rather than a GroupResult (its own behaviour with its own documents).
    restores_group_results = False

    @pytest.fixture
    def result_url(self, mongodb_url: str) -> str:  # noqa: F811
        return mongodb_url

    @pytest.fixture
    def raw(self, mongodb_url: str) -> Iterator[Any]:  # noqa: F811
        """The shared database through plain pymongo (to look at documents as stored)."""
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
        yield client.get_default_database()
        client.close()

    def test_extended_fields_stored_by_celery_are_read_by_conveyor(
        self, extended_app: Celery, ours: MongoDBResultBackend
    ) -> None:
        task_id = unique_name("celery-ext")
        request = Context(
            id=task_id,
            task="proj.tasks.add",
            args=[2, "three"],
            kwargs={"x": 1},
            hostname="celery@host-1",
            retries=2,
            delivery_info={"routing_key": "celery"},
            group=unique_name("g"),
            parent_id=unique_name("p"),
        )
        extended_app.backend.store_result(task_id, 5, "SUCCESS", request=request)
        got = ours.fetch(task_id)
        assert got is not None
        assert got.result == 5
        assert got.group_id == request.group
        assert got.parent_id == request.parent_id
        assert got.extended == {
            "name": "proj.tasks.add",
            "args": [2, "three"],
            "kwargs": {"x": 1},
            "worker": "celery@host-1",
            "retries": 2,
            "queue": "celery",
        }

    def test_celery_documents_expire_for_conveyor_by_date_done(
        self,
        mongodb_url: str,  # noqa: F811
        raw: Any,
    ) -> None:
        # Own collections: a purge with a 1 s default_ttl would also take every other test's
        # Celery-written documents.
        tasks, groups = unique_name("taskmeta"), unique_name("groupmeta")
        app = celery_app(mongodb_url)
        app.conf.mongodb_backend_settings = {
            "taskmeta_collection": tasks,
            "groupmeta_collection": groups,
        }
        short = MongoDBResultBackend.from_url(
            mongodb_url, default_ttl=2.0, taskmeta_collection=tasks, groupmeta_collection=groups
        )
        try:
            task_id = unique_name("celery-old")
            short.create_indexes()
            before = time.monotonic()
            app.backend.store_result(task_id, "old", "SUCCESS")
            found = short.fetch(task_id)
            if time.monotonic() - before < 1.5:  # a slow test server may take longer than that
                assert found is not None
            time.sleep(max(0.0, before + 2.5 - time.monotonic()))
            assert short.fetch(task_id) is None, "a Celery result outlived date_done + default_ttl"
            assert short.purge_expired() == 1
            assert app.backend.get_task_meta(task_id)["status"] == "PENDING"
        finally:
            short.close()
            app.close()
            raw.drop_collection(tasks)
            raw.drop_collection(groups)

    def test_children_and_extended_fields_stored_by_conveyor_are_read_by_celery(
        self, extended_app: Celery, ours: MongoDBResultBackend
    ) -> None:
        task_id, child = unique_name("ours-parent"), unique_name("ours-child")
        ours.store(
            ResultRecord(
                task_id,
                State.SUCCESS,
                [1, 2],
                date_done=datetime.now(UTC),
                children=[[[child, None], None]],
                extended={
                    "name": "proj.tasks.add",
                    "args": [1, "two"],
                    "kwargs": {"k": "v"},
                    "worker": "conveyor@host",
                    "retries": 1,
                    "queue": "default",
                },
            )
        )
        result = AsyncResult(task_id, app=extended_app)
        assert result.get(timeout=TIMEOUT) == [1, 2]
        assert [c.id for c in result.children] == [child]
        assert (result.name, result.args, result.kwargs) == (
            "proj.tasks.add",
            [1, "two"],
            {"k": "v"},
        )
        assert (result.worker, result.retries, result.queue) == ("conveyor@host", 1, "default")

    def test_conveyor_documents_have_celerys_fields_and_types(
        self, ours: MongoDBResultBackend, raw: Any
    ) -> None:
        task_id = unique_name("ours-layout")
        ours.store(ResultRecord(task_id, State.SUCCESS, {"a": 1}, date_done=datetime.now(UTC)))
        doc = raw["celery_taskmeta"].find_one({"_id": task_id})
        assert doc is not None
        assert set(doc) == {
            "_id",
            "status",
            "result",
            "traceback",
            "children",
            "date_done",
            "expires_at",
        }
        assert doc["status"] == "SUCCESS"
        assert doc["result"] == '{"a": 1}'  # JSON text, as Celery's json result serializer writes
        assert isinstance(doc["date_done"], datetime)
        assert isinstance(doc["expires_at"], datetime)
        eventually(lambda: ours.fetch(task_id) is not None, 5)

"""MongoDBResultBackend beyond the conformance suite: the TTL index at work, the documents
as stored, documents other writers left behind, options and failures.

Servers: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/support/mongo.py``), and for the TTL-monitor
test a private SecantusDB sweeping every second (skipped when SecantusDB is not installed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pymongo import MongoClient
from support.mongo import (  # noqa: F401 - fixtures
    mongodb_url,
    private_secantus,
    unreachable_mongodb_url,
)

from conveyor.backends.mongodb import MongoDBResultBackend
from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError, ConnectionLost
from conveyor.core.registry import Registry, result_backend_from_url
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import eventually, unique_name

UTC = timezone.utc


def _ok(task_id: str, value: object = "v") -> ResultRecord:
    return ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC))


@pytest.fixture
def backend(mongodb_url: str) -> Iterator[MongoDBResultBackend]:  # noqa: F811
    made = MongoDBResultBackend.from_url(mongodb_url)
    yield made
    made.close()


@pytest.fixture
def raw(mongodb_url: str) -> Iterator[Any]:  # noqa: F811
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    yield client.get_default_database("celery")
    client.close()


# ================================================================== the TTL index
def test_the_ttl_index_deletes_expired_documents_on_a_server_that_sweeps(
    private_secantus: str,  # noqa: F811
) -> None:
    backend = MongoDBResultBackend.from_url(private_secantus)
    client: MongoClient[dict[str, Any]] = MongoClient(private_secantus)
    db = client.get_default_database()
    try:
        task_id, group_id, key = unique_name("t"), unique_name("g"), unique_name("k")
        backend.store(_ok(task_id), ttl=1.0)
        backend.store_group(GroupRecord(group_id, (task_id,)), ttl=1.0)
        backend.incr(key, ttl=1.0)
        keeper = unique_name("keeper")
        backend.store(_ok(keeper), ttl=300.0)
        assert db.celery_taskmeta.find_one({"_id": task_id}) is not None

        def swept() -> bool:
            return (
                db.celery_taskmeta.find_one({"_id": task_id}) is None
                and db.celery_groupmeta.find_one({"_id": group_id}) is None
                and db.conveyor_counters.find_one({"_id": key}) is None
            )

        eventually(swept, 20, message="TTL monitor deleted the documents")
        assert db.celery_taskmeta.find_one({"_id": keeper}) is not None
    finally:
        backend.close()
        client.close()


def test_the_indexes_are_celerys_date_done_and_ttl_indexes_on_expires_at(
    backend: MongoDBResultBackend, raw: Any
) -> None:
    backend.create_indexes()
    backend.create_indexes()  # idempotent
    names = backend.options
    for collection in (names.taskmeta_collection, names.groupmeta_collection):
        info = raw[collection].index_information()
        by_key = {tuple(k for k, _ in v["key"]): v for v in info.values()}
        assert by_key[("date_done",)]["key"] == [("date_done", 1)]
        assert by_key[("expires_at",)]["expireAfterSeconds"] == 0
    counters = raw[names.counter_collection].index_information()
    assert any(v.get("expireAfterSeconds") == 0 for v in counters.values())


# ================================================================== documents left by others
@pytest.fixture
def unswept(mongodb_url: str, raw: Any) -> Iterator[MongoDBResultBackend]:  # noqa: F811
    """A backend on collections of its own WITHOUT the TTL index: expired documents stay
    until this test's own writes deal with them (the server's TTL monitor never runs in
    between; SecantusDB's monitor may even delete a document rewritten a moment earlier,
    from an older snapshot)."""
    names: dict[str, Any] = {
        "taskmeta_collection": unique_name("tasks"),
        "groupmeta_collection": unique_name("groups"),
        "counter_collection": unique_name("counters"),
    }
    made = MongoDBResultBackend.from_url(mongodb_url, create_indexes=False, **names)
    yield made
    made.close()
    for name in names.values():
        raw.drop_collection(name)


def test_an_expired_success_not_yet_swept_counts_as_absent(
    unswept: MongoDBResultBackend, raw: Any
) -> None:
    stale, live = unique_name("stale"), unique_name("live")
    past = datetime.now(UTC) - timedelta(seconds=5)
    for task_id, expires in ((stale, past), (live, past + timedelta(hours=1))):
        raw[unswept.options.taskmeta_collection].insert_one(
            {
                "_id": task_id,
                "status": "SUCCESS",
                "result": '"old"',
                "traceback": None,
                "children": [],
                "date_done": past,
                "expires_at": expires,
            }
        )
    assert unswept.fetch(stale) is None
    assert unswept.fetch(live) is not None
    unswept.store(_ok(stale, "new"))
    unswept.store(_ok(live, "new"))
    assert unswept.fetch(stale).result == "new"  # type: ignore[union-attr]
    assert unswept.fetch(live).result == "old"  # type: ignore[union-attr]


def test_an_expired_counter_not_yet_swept_starts_again_from_zero(
    unswept: MongoDBResultBackend, raw: Any
) -> None:
    counter, members = unique_name("counter"), unique_name("join")
    past = datetime.now(UTC) - timedelta(seconds=5)
    raw[unswept.options.counter_collection].insert_many(
        [
            {"_id": counter, "value": 7, "expires_at": past},
            {"_id": members, "members": ["a", "b"], "expires_at": past},
        ]
    )
    assert unswept.incr(counter) == 1
    assert unswept.add_member(members, "b") == 1
    assert unswept.add_member(members, "$not-a-field-path") == 2


def test_documents_of_celery_before_5_4_with_string_dates_are_read(
    backend: MongoDBResultBackend, raw: Any
) -> None:
    task_id = unique_name("old-celery")
    raw.celery_taskmeta.insert_one(
        {
            "_id": task_id,
            "status": "SUCCESS",
            "result": "[1, 2]",
            "traceback": None,
            "children": [],
            "date_done": "2020-01-02T03:04:05.678901",
        }
    )
    got = backend.fetch(task_id)
    assert got is not None
    assert got.result == [1, 2]
    assert got.date_done == datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def test_purge_expired_removes_what_celery_cleanup_would_and_what_the_monitor_missed(
    mongodb_url: str,  # noqa: F811
    raw: Any,
) -> None:
    backend = MongoDBResultBackend.from_url(mongodb_url, default_ttl=3600.0)
    try:
        now = datetime.now(UTC)
        old_celery, new_celery, pending, ours = (unique_name(p) for p in "ABCD")
        raw.celery_taskmeta.insert_many(
            [
                {"_id": old_celery, "status": "SUCCESS", "date_done": now - timedelta(hours=2)},
                {"_id": new_celery, "status": "SUCCESS", "date_done": now},
                {"_id": pending, "status": "STARTED", "date_done": None},
                {"_id": ours, "status": "SUCCESS", "date_done": now, "expires_at": now},
            ]
        )
        assert backend.purge_expired(batch_size=1) >= 0  # others may purge the same documents
        left = {
            d["_id"]
            for d in raw.celery_taskmeta.find(
                {"_id": {"$in": [old_celery, new_celery, pending, ours]}}
            )
        }
        assert left == {new_celery, pending}
    finally:
        backend.close()


# ================================================================== what we write
def test_binary_serializers_store_bson_binary_as_celery_does(
    mongodb_url: str,  # noqa: F811
    raw: Any,
) -> None:
    # pickle: a binary serializer that needs no extra (msgpack behaves the same)
    backend = MongoDBResultBackend.from_url(mongodb_url, serializer="pickle")
    try:
        task_id = unique_name("pickle")
        backend.store(_ok(task_id, {"a": [1, 2]}))
        doc = raw.celery_taskmeta.find_one({"_id": task_id})
        assert isinstance(doc["result"], bytes)
        assert backend.fetch(task_id).result == {"a": [1, 2]}  # type: ignore[union-attr]
    finally:
        backend.close()


def test_a_ready_record_without_date_done_gets_one_and_extended_cannot_clobber_fields(
    backend: MongoDBResultBackend, raw: Any
) -> None:
    task_id = unique_name("no-date")
    backend.store(
        ResultRecord(task_id, State.SUCCESS, 1, extended={"status": "FAILURE", "name": "t"})
    )
    doc = raw.celery_taskmeta.find_one({"_id": task_id})
    assert doc["status"] == "SUCCESS"
    assert doc["name"] == "t"
    assert isinstance(doc["date_done"], datetime)
    got = backend.fetch(task_id)
    assert got is not None
    assert got.extended == {"name": "t"}


# ================================================================== options and failures
def test_the_database_is_the_option_else_the_url_path_else_celery() -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("mongodb://127.0.0.1:1/results", {}, "results"),
        ("mongodb://127.0.0.1:1/results?database=other", {}, "other"),
        ("mongodb://127.0.0.1:1", {}, "celery"),
    ]
    for url, options, database in cases:
        made = MongoDBResultBackend.from_url(url, **options)
        try:
            assert made._tasks.database.name == database, url
        finally:
            made.close()


def test_collection_names_follow_celerys_settings() -> None:
    made = MongoDBResultBackend.from_url(
        "mongodb://127.0.0.1:1/db?taskmeta_collection=tasks&groupmeta_collection=groups"
    )
    try:
        assert (made._tasks.name, made._groups.name) == ("tasks", "groups")
    finally:
        made.close()
    with pytest.raises(ConfigurationError):
        MongoDBResultBackend.from_url("mongodb://127.0.0.1:1/db?taskmeta_collection=$bad")


def test_both_schemes_are_registered_result_backends() -> None:
    made = result_backend_from_url("mongodb://127.0.0.1:1/db", registry=Registry())
    try:
        assert isinstance(made, MongoDBResultBackend)
        assert Capability.WAIT not in made.capabilities
        assert Capability.NATIVE_TTL in made.capabilities
    finally:
        made.close()


def test_an_unreachable_server_raises_connection_lost_within_its_selection_timeout() -> None:
    made = MongoDBResultBackend.from_url(unreachable_mongodb_url())
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            made.fetch("x")
        with pytest.raises(ConnectionLost):
            made.store(_ok("x"))
        assert time.monotonic() - start < 15
    finally:
        made.close()


def test_after_close_every_operation_raises_connection_lost(
    mongodb_url: str,  # noqa: F811
) -> None:
    made = MongoDBResultBackend.from_url(mongodb_url)
    made.close()
    made.close()
    for call in (
        lambda: made.fetch("x"),
        lambda: made.store(_ok("x")),
        lambda: made.incr("x"),
        lambda: made.fetch_group("x"),
    ):
        with pytest.raises(ConnectionLost):
            call()


def test_create_indexes_false_leaves_indexes_to_an_explicit_call(
    unswept: MongoDBResultBackend, raw: Any
) -> None:
    tasks = unswept.options.taskmeta_collection
    unswept.store(_ok(unique_name("t")))
    assert set(raw[tasks].index_information()) == {"_id_"}
    unswept.create_indexes()
    info = raw[tasks].index_information().values()
    assert any(v.get("expireAfterSeconds") == 0 for v in info)

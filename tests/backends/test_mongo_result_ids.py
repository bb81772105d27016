"""The MongoDB result backend against hostile ids (the operator injection of issue 13), a
closed client, documents BSON or the server refuse, undecodable results and secrets.

Before the fix, ``fetch({"$ne": None})`` returned another task's result, ``{"$regex": ...}``
enumerated ids and ``forget({"$ne": None})`` deleted a victim. Checks shared with the other
backends live in ``hostileids.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
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
from support.mongo import free_port, mongodb_url, unreachable_mongodb_url  # noqa: F401

from conveyor.backends.mongodb import MongoDBResultBackend, MongoDBResultBackendOptions
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    OperationalError,
)
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import unique_name

SECRET = "s3cr3t-mongo-pw"
UTC = timezone.utc


class _Commands(monitoring.CommandListener):
    """Every command the client sends (the proof that a refused id reached nothing)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def options() -> MongoDBResultBackendOptions:
    """Collections of this test's own (dropped after)."""
    suffix = unique_name("ids").replace("-", "_")
    return MongoDBResultBackendOptions(
        taskmeta_collection=f"tm_{suffix}",
        groupmeta_collection=f"gm_{suffix}",
        counter_collection=f"ct_{suffix}",
    )


@pytest.fixture
def watched(
    mongodb_url: str,  # noqa: F811
    options: MongoDBResultBackendOptions,
) -> Iterator[tuple[MongoDBResultBackend, _Commands, Any]]:
    """A backend whose client reports every command, and the raw database."""
    listener = _Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(
        mongodb_url, event_listeners=[listener], serverSelectionTimeoutMS=5000
    )
    backend = MongoDBResultBackend(client, options)
    backend.create_indexes()
    db = client.get_default_database("celery")
    yield backend, listener, db
    for name in (options.taskmeta_collection, options.groupmeta_collection):
        db.drop_collection(name)
    db.drop_collection(options.counter_collection)
    backend.close()
    client.close()


@pytest.fixture
def backend(
    watched: tuple[MongoDBResultBackend, _Commands, Any],
) -> MongoDBResultBackend:
    return watched[0]


def _ok(task_id: str, value: Any = "secret") -> ResultRecord:
    return ResultRecord(task_id, State.SUCCESS, value, date_done=datetime.now(UTC), children=[])


# ================================================================== the injection
def test_operator_ids_read_enumerate_and_delete_nothing(
    watched: tuple[MongoDBResultBackend, _Commands, Any],
) -> None:
    backend, listener, db = watched
    victim = unique_name("victim")
    backend.store(_ok(victim, "the victim's secret"), ttl=60)
    backend.store_group(GroupRecord(victim, (victim,)), ttl=60)
    assert backend.incr(victim, 7, ttl=60) == 7
    listener.names.clear()
    attacks: list[Callable[[], object]] = [
        lambda: backend.fetch({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.fetch({"$regex": "^victim"}),  # type: ignore[arg-type]
        lambda: backend.fetch({"$gt": ""}),  # type: ignore[arg-type]
        lambda: backend.fetch_many([{"$regex": "."}]),  # type: ignore[list-item]
        lambda: backend.fetch_many({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.forget({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.forget({"$regex": "."}),  # type: ignore[arg-type]
        lambda: backend.fetch_group({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.forget_group({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.incr({"$ne": None}, 1),  # type: ignore[arg-type]
        lambda: backend.add_member({"$ne": None}, "m"),  # type: ignore[arg-type]
        lambda: backend.forget_key({"$ne": None}),  # type: ignore[arg-type]
        lambda: backend.store(_ok({"$ne": None})),  # type: ignore[arg-type]
    ]
    for attack in attacks:
        with pytest.raises(ConfigurationError, match=r"must be a str|sequence of task ids"):
            attack()
    assert listener.names == []  # not one command reached the server
    got = backend.fetch(victim)
    assert got is not None
    assert got.result == "the victim's secret"
    assert backend.fetch_group(victim) is not None
    assert backend.incr(victim, 0, ttl=60) == 7
    assert db[backend.options.taskmeta_collection].count_documents({}) == 1


@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_ids_that_are_not_strings_are_refused_everywhere_and_send_no_command(
    watched: tuple[MongoDBResultBackend, _Commands, Any], bad: Any
) -> None:
    backend, listener, _db = watched
    listener.names.clear()
    assert_refused_everywhere(backend, bad)
    assert listener.names == []


def test_ids_that_are_not_strings_never_reach_the_driver() -> None:
    backend = MongoDBResultBackend.from_url(unreachable_mongodb_url())
    try:
        for bad in NOT_STRINGS[:4]:
            assert_refused_everywhere(backend, bad)
        with pytest.raises(OperationalError):
            backend.fetch("a-proper-id")  # the control: a real id does reach the driver
    finally:
        backend.close()


# ================================================================== odd strings
@pytest.mark.parametrize("name", list(ODD_IDS))
def test_an_odd_id_is_stored_exactly_or_refused_everywhere(
    backend: MongoDBResultBackend, name: str
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    refused = {"NUL", "lone surrogate", "escaped surrogate", "10,000 characters"}
    refused.add("1025 UTF-8 bytes")
    assert stored is (name not in refused)


def test_lookalike_ids_never_read_or_delete_each_other(backend: MongoDBResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


# ================================================================== closed, documents
def test_a_closed_backend_raises_connection_lost_everywhere(
    mongodb_url: str,  # noqa: F811
    options: MongoDBResultBackendOptions,
) -> None:
    backend = MongoDBResultBackend.from_url(
        mongodb_url,
        taskmeta_collection=options.taskmeta_collection,
        groupmeta_collection=options.groupmeta_collection,
        counter_collection=options.counter_collection,
    )
    assert_closed_backend_raises_connection_lost(backend)


def test_a_result_that_cannot_be_encoded_is_an_encode_error(
    backend: MongoDBResultBackend,
) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


@pytest.mark.parametrize(
    "fields",
    [
        {"extended": {"$set": {"status": "SUCCESS"}}},
        {"extended": {"a.b": 1}},
        {"extended": {"kwargs": {"key\x00with NUL": 1}}},
        {"extended": {"kwargs": {1: "int key"}}},
        {"extended": {"kwargs": {"x": object()}}},
        {"traceback": "a lone \ud800 surrogate"},
        {"children": [["id", {"\udcff": 1}]]},
    ],
    ids=["dollar field", "dotted field", "NUL key", "int key", "object", "surrogate", "child"],
)
def test_a_document_bson_or_the_server_cannot_hold_is_an_encode_error(
    backend: MongoDBResultBackend, fields: dict[str, Any]
) -> None:
    task_id = unique_name("doc")
    record = ResultRecord(task_id, State.SUCCESS, 1, date_done=datetime.now(UTC), **fields)
    with pytest.raises(EncodeError):
        backend.store(record, ttl=60)
    assert backend.fetch(task_id) is None


def test_a_stored_result_that_cannot_be_decoded_is_a_decode_error(
    watched: tuple[MongoDBResultBackend, _Commands, Any],
) -> None:
    backend, _listener, db = watched
    task_id = unique_name("garbage")
    db[backend.options.taskmeta_collection].insert_one(
        {"_id": task_id, "status": "SUCCESS", "result": "{not json", "date_done": None}
    )
    with pytest.raises(DecodeError):
        backend.fetch(task_id)
    with pytest.raises(DecodeError):
        backend.fetch_many([task_id])


# ================================================================== secrets
def test_no_password_shows_in_errors_or_reprs() -> None:
    url = f"mongodb://user:{SECRET}@127.0.0.1:{free_port()}/db?server_selection_timeout=1"
    backend = MongoDBResultBackend.from_url(url)
    try:
        with pytest.raises(OperationalError) as info:
            backend.fetch("some-task")
        for text in (str(info.value), repr(backend), repr(backend.options)):
            assert SECRET not in text
    finally:
        backend.close()

"""MongoDBBroker beyond the conformance suite: URL handling, error translation, the stored
document, indexes, delayed promotion, dead letters and concurrent consumers.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/support/mongo.py``) where one is needed; the URL
and error-mapping tests need none. Counts stay small: the default test server (SecantusDB)
does tens of claims per second.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from bson.errors import InvalidDocument
from pymongo import MongoClient
from pymongo import errors as mongo_errors
from support.mongo import mongodb_url, server_description, unreachable_mongodb_url  # noqa: F401

from conveyor._drivers.mongodb import driver_defaults, split_mongodb_url, translate_error
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    EncodeError,
    InvalidReceipt,
    InvalidURL,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.registry import Registry, broker_from_url
from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.mongodb import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    MongoDBBroker,
)

OPTIONS = ("lease_seconds", "database", "collection", "poll_interval")


def _env(body: bytes = b"{}", **fields: Any) -> Envelope:
    return Envelope(id=fields.pop("id", uuid.uuid4().hex), body=body, **fields)


@pytest.fixture
def make(mongodb_url: str) -> Iterator[Any]:  # noqa: F811
    made: list[MongoDBBroker] = []
    queues: list[str] = []

    def build(**options: Any) -> MongoDBBroker:
        broker = MongoDBBroker.from_url(mongodb_url, **options)
        made.append(broker)
        return broker

    build.queues = queues  # type: ignore[attr-defined]
    yield build
    for broker in made:
        broker.close()
    cleaner = MongoDBBroker.from_url(mongodb_url)
    for queue in queues:
        cleaner.purge(queue)
        cleaner.purge(cleaner.dead_letter_queue(queue))
    cleaner.close()


def _queue(make: Any) -> str:
    name = unique_name("mongo")
    make.queues.append(name)
    return str(name)


@pytest.fixture
def raw(mongodb_url: str) -> Iterator[Any]:  # noqa: F811
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    yield client.get_default_database("conveyor")
    client.close()


# ================================================================== URLs
@pytest.mark.parametrize(
    ("url", "driver_url", "ours"),
    [
        ("mongodb://h:27017/db", "mongodb://h:27017/db", {}),
        (
            "mongodb://h/db?lease_seconds=5&w=majority&collection=q",
            "mongodb://h/db?w=majority",
            {"lease_seconds": "5", "collection": "q"},
        ),
        (
            "mongodb://u:p%40ss@h1:27017,h2:27018,h3/db?replicaSet=rs0&lease_seconds=2"
            "&readPreferenceTags=dc:ny,rack:1&readPreferenceTags=",
            "mongodb://u:p%40ss@h1:27017,h2:27018,h3/db?replicaSet=rs0"
            "&readPreferenceTags=dc:ny,rack:1&readPreferenceTags=",
            {"lease_seconds": "2"},
        ),
        (
            "mongodb+srv://u:p@cluster0.example.net/app?retryWrites=true&database=other",
            "mongodb+srv://u:p@cluster0.example.net/app?retryWrites=true",
            {"database": "other"},
        ),
        ("mongodb://h/?poll_interval=0.5", "mongodb://h/", {"poll_interval": "0.5"}),
        (
            "mongodb://h/db?w=1;lease_seconds=3;journal=true",
            "mongodb://h/db?w=1;journal=true",
            {"lease_seconds": "3"},
        ),
    ],
)
def test_only_conveyor_options_are_taken_out_of_the_url(
    url: str, driver_url: str, ours: dict[str, str]
) -> None:
    assert split_mongodb_url(url, OPTIONS) == (driver_url, ours)


@pytest.mark.parametrize(
    "url", ["mongodb://", "mongo://h/db", "redis://h:6379/0", "mongodb://h:99999/db"]
)
def test_urls_that_are_not_mongodb_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidURL):
        split_mongodb_url(url, OPTIONS)


def test_pymongo_never_sees_a_conveyor_option(mongodb_url: str) -> None:  # noqa: F811
    sep = "&" if "?" in mongodb_url else "?"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pymongo warns about URI options it does not know
        broker = MongoDBBroker.from_url(
            f"{mongodb_url}{sep}lease_seconds=7&promote_interval=0&collection=conveyor_messages"
        )
    try:
        assert broker.options.lease_seconds == 7.0
        assert broker.options.promote_interval == 0.0
    finally:
        broker.close()


def test_unknown_options_fail_loudly_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match="Did you mean 'lease_seconds'"):
        MongoDBBroker.from_url("mongodb://u:s3cret@127.0.0.1:1/db?lease_secnds=5")
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        MongoDBBroker.from_url("mongodb://127.0.0.1:1/db", lease_secnds=5)
    with pytest.raises(ConfigurationError) as info:
        MongoDBBroker.from_url("mongodb://u:s3cret@127.0.0.1:1/db?w=majority&journal=maybe")
    assert "s3cret" not in str(info.value)


def test_driver_defaults_never_override_what_the_url_says() -> None:
    kwargs = driver_defaults(
        "mongodb://h/db?connectTimeoutMS=1234&AppName=mine&timeoutMS=5000",
        connect_timeout=10.0,
        server_selection_timeout=2.5,
        operation_timeout=30.0,
    )
    assert kwargs == {"serverSelectionTimeoutMS": 2500}
    assert driver_defaults(
        "mongodb://h/db", connect_timeout=None, server_selection_timeout=None, operation_timeout=1.5
    ) == {"appname": "conveyor", "socketTimeoutMS": 1500}


def test_the_database_is_the_option_else_the_url_path_else_conveyor() -> None:
    cases = [
        ("mongodb://127.0.0.1:1/fromurl", {}, "fromurl"),
        ("mongodb://127.0.0.1:1/fromurl?database=fromquery", {}, "fromquery"),
        ("mongodb://127.0.0.1:1/fromurl", {"database": "fromkw"}, "fromkw"),
        ("mongodb://127.0.0.1:1/", {}, "conveyor"),
        ("mongodb://127.0.0.1:1", {}, "conveyor"),
    ]
    for url, options, database in cases:
        broker = MongoDBBroker.from_url(url, **options)
        try:
            assert broker.collection.database.name == database, url
            assert broker.collection.name == "conveyor_messages"
        finally:
            broker.close()


def test_both_schemes_are_registered_brokers() -> None:
    broker = broker_from_url("mongodb://127.0.0.1:1/db", registry=Registry())
    try:
        assert isinstance(broker, MongoDBBroker)
    finally:
        broker.close()


def test_a_password_never_shows_in_repr_or_errors() -> None:
    port = unreachable_mongodb_url().split(":")[2].split("/")[0]
    url = f"mongodb://user:s3cr%3Fet@127.0.0.1:{port}/db?server_selection_timeout=0.5"
    broker = MongoDBBroker.from_url(url)
    try:
        assert "s3cr" not in repr(broker)
        assert "***" in repr(broker)
        with pytest.raises(ConnectionLost) as info:
            broker.publish(_env(), queue="q")
        assert "s3cr" not in str(info.value)
    finally:
        broker.close()


# ================================================================== error translation
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (mongo_errors.ServerSelectionTimeoutError("no servers"), ConnectionLost),
        (mongo_errors.AutoReconnect("reset"), ConnectionLost),
        (mongo_errors.NotPrimaryError("not primary"), ConnectionLost),
        (mongo_errors.NetworkTimeout("timed out"), OperationTimeout),
        (mongo_errors.ExecutionTimeout("maxTimeMS", 50), OperationTimeout),
        (mongo_errors.WTimeoutError("wtimeout", 64), OperationTimeout),
        (mongo_errors.InvalidOperation("MongoClient after close"), ConnectionLost),
        (mongo_errors.DocumentTooLarge("too big"), EncodeError),
        (InvalidDocument("bad key"), EncodeError),
        (mongo_errors.InvalidURI("bad uri"), InvalidURL),
        (mongo_errors.ConfigurationError("bad option"), ConfigurationError),
        (mongo_errors.OperationFailure("auth failed", 18), ConfigurationError),
        (mongo_errors.OperationFailure("not authorized", 13), ConfigurationError),
        (mongo_errors.OperationFailure("index conflict", 85), ConfigurationError),
        (mongo_errors.OperationFailure("interrupted", 11601), OperationalError),
        (mongo_errors.PyMongoError("other"), OperationalError),
    ],
)
def test_driver_errors_map_onto_conveyors_tree(exc: BaseException, expected: type) -> None:
    got = translate_error(exc, what="op", url="mongodb://u:secret@h/db")
    assert type(got) is expected
    assert "secret" not in str(got)
    assert "op on mongodb://u:***@h/db" in str(got)


def test_an_unreachable_server_raises_connection_lost_within_its_selection_timeout() -> None:
    broker = MongoDBBroker.from_url(unreachable_mongodb_url())
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            broker.receive("q", timeout=0)
        assert time.monotonic() - start < 10
    finally:
        broker.close()


# ================================================================== documents and indexes
def test_the_stored_document_keeps_headers_mongodb_could_not_take_as_field_names(
    make: Any, raw: Any
) -> None:
    broker = make()
    queue = _queue(make)
    headers = {"a.b": 1, "$where": "x", "nested": {"c.d": [1, {"$e": None}]}, "": "empty"}
    sent = _env(b"\x00\xffbody", headers=headers, priority=4, correlation_id="c", reply_to="r")
    broker.publish(sent, queue=queue)
    doc = raw[broker.collection.name].find_one({"queue": queue})
    assert doc is not None
    assert isinstance(doc["headers"], str)  # JSON text, never sub-document field names
    assert doc["body"] == b"\x00\xffbody"
    assert (doc["state"], doc["priority"], doc["delivery_count"]) == ("ready", 4, 0)
    assert doc["lease_owner"] is None
    [got] = broker.receive(queue, timeout=5)
    assert got.envelope == sent
    broker.ack(got)


def test_the_claim_and_due_indexes_are_created_once_and_idempotently(make: Any, raw: Any) -> None:
    first, second = make(), make()
    first.create_indexes()
    second.create_indexes()
    info = raw[first.collection.name].index_information()
    assert info["conveyor_claim"]["key"] == [
        ("queue", 1),
        ("state", 1),
        ("priority", -1),
        ("_id", 1),
    ]
    assert info["conveyor_due"]["key"] == [("queue", 1), ("state", 1), ("due", 1)]


def test_a_delayed_message_waits_in_the_delayed_state_until_promoted(make: Any, raw: Any) -> None:
    broker = make(promote_interval=0.0)
    queue = _queue(make)
    sent = _env()
    delay = 1.0
    start = time.monotonic()
    broker.publish(sent, queue=queue, delay=delay)
    doc = raw[broker.collection.name].find_one({"queue": queue})
    assert doc["state"] == "delayed"
    early = broker.receive(queue, timeout=0)
    if time.monotonic() - start < delay:  # a slow test server may already be past it
        assert early == []
    [got] = early or eventually(lambda: broker.receive(queue, timeout=0.1), 10 + delay)
    assert time.monotonic() - start >= delay
    assert got.envelope.id == sent.id
    assert raw[broker.collection.name].find_one({"queue": queue})["state"] == "ready"
    broker.ack(got)


def test_a_dead_letter_says_where_it_came_from_and_why(make: Any) -> None:
    broker = make()
    queue = _queue(make)
    broker.publish(_env(headers={"task": "t"}), queue=queue)
    [got] = broker.receive(queue, timeout=5)
    broker.reject(got, requeue=False, reason="ValueError: boom")
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=5)
    assert dead.envelope.headers[DEAD_LETTER_REASON_HEADER] == "ValueError: boom"
    assert dead.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
    assert dead.delivery_count == 1
    assert dead.redelivered is False
    broker.ack(dead)


def test_receive_from_several_queues_prefers_priority_then_the_oldest_message(make: Any) -> None:
    broker = make()
    first, second = _queue(make), _queue(make)
    old, new, urgent = _env(b"old"), _env(b"new"), _env(b"urgent", priority=9)
    broker.publish(old, queue=second)
    broker.publish(new, queue=first)
    broker.publish(urgent, queue=second)
    got: list[Any] = []
    while len(got) < 3:
        got += broker.receive([first, second], timeout=5)
    assert [d.envelope.id for d in got] == [urgent.id, old.id, new.id]
    for delivery in got:
        broker.ack(delivery)


def test_a_batch_receive_and_single_receives_agree_on_order(make: Any) -> None:
    broker = make()
    queue = _queue(make)
    sent = [_env(bytes([i]), priority=i % 3) for i in range(12)]
    broker.publish_many(sent, queue=queue)
    expected = sorted(sent, key=lambda e: -e.priority)  # stable: FIFO within a priority
    batch = broker.receive(queue, max_messages=6, timeout=5)
    singles = [broker.receive(queue, timeout=5)[0] for _ in range(6)]
    assert [d.envelope.id for d in batch + singles] == [e.id for e in expected]
    for delivery in batch + singles:
        broker.ack(delivery)


def test_extend_after_ack_and_foreign_receipts_raise_invalid_receipt(make: Any) -> None:
    broker, other = make(), make()
    queue = _queue(make)
    broker.publish(_env(), queue=queue)
    [got] = broker.receive(queue, timeout=5)
    broker.ack(got)
    with pytest.raises(InvalidReceipt):
        broker.extend(got, 5.0)
    with pytest.raises(ConfigurationError):
        other.extend(got, -1.0)


def test_a_message_too_large_for_mongodb_is_an_encode_error(make: Any) -> None:
    broker = make()
    queue = _queue(make)
    with pytest.raises(EncodeError):
        broker.publish(_env(b"x" * (17 << 20)), queue=queue)
    with pytest.raises(EncodeError):
        broker.publish(_env(headers={"bad": object()}), queue=queue)


# ================================================================== concurrency (small)
def test_concurrent_consumers_with_mixed_batch_sizes_lose_and_duplicate_nothing(
    make: Any,
) -> None:
    queue = _queue(make)
    producer = make()
    sent = [_env(str(i).encode()) for i in range(90)]
    producer.publish_many(sent[:45], queue=queue)
    consumers = [make(lease_seconds=30.0) for _ in range(3)]
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.monotonic() + 120

    def consume(index: int) -> None:
        broker = consumers[index]
        try:
            while time.monotonic() < deadline:
                with lock:
                    if sum(seen.values()) >= len(sent):
                        return
                batch = broker.receive(queue, max_messages=(1, 5, 10)[index], timeout=0.2)
                for delivery in batch:
                    broker.ack(delivery)
                with lock:
                    seen.update(d.envelope.id for d in batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for envelope in sent[45:]:
        producer.publish(envelope, queue=queue)
    for thread in threads:
        thread.join(timeout=150)
    assert not errors, errors
    assert [i for i, n in seen.items() if n > 1] == []
    assert set(seen) == {e.id for e in sent}


def test_the_server_is_identified_for_the_test_report(mongodb_url: str) -> None:  # noqa: F811
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    try:
        text = server_description(client.server_info())
    finally:
        client.close()
    assert text.startswith(("MongoDB ", "SecantusDB ", "FerretDB "))
    print(f"mongodb server: {text}")

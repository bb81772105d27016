"""Issue 13 on the MongoDB broker: documents another writer left in the message collection
never stop a consumer, never come back and never hide the good ones; ids and queue names are
compared as data, never read as query operators; dead-letter reasons are recorded whatever
they are; delays past the year 9999 are refused; unknown URL options fail with a suggestion
whatever pymongo's own error text says.

Bad documents are inserted with pymongo directly. Counts stay small: the default test server
(SecantusDB) does tens of claims per second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from bson import Binary, Int64
from support.mongo import mongodb_url  # noqa: F401 - a fixture

from conveyor._drivers import mongodb
from conveyor.core.errors import ConfigurationError
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.support import unique_name
from conveyor.transports._common import MAX_REASON_CHARS, ORIGINAL_HEADER, UNDECODABLE_CONTENT_TYPE
from conveyor.transports.mongodb import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    MongoDBBroker,
)

Make = Callable[..., MongoDBBroker]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def make(mongodb_url: str) -> Iterator[Make]:  # noqa: F811
    made: list[MongoDBBroker] = []

    def build(**options: Any) -> MongoDBBroker:
        broker = MongoDBBroker.from_url(mongodb_url, **options)
        made.append(broker)
        return broker

    yield build
    for broker in made:
        broker.close()


@pytest.fixture
def queue(mongodb_url: str) -> Iterator[str]:  # noqa: F811
    name = unique_name("mongobad")
    yield name
    cleaner = MongoDBBroker.from_url(mongodb_url)
    cleaner.collection.delete_many({"queue": {"$in": [name, name + ".dead", name + ".dead.dead"]}})
    cleaner.close()


def _insert(broker: MongoDBBroker, into: str, **fields: Any) -> None:
    now = datetime.now(timezone.utc)
    doc = {
        "queue": into,
        "state": "ready",
        "priority": 0,
        "due": now,
        "lease_owner": None,
        "lease_expires": EPOCH,
        "delivery_count": 0,
        "message_id": unique_name("doc"),
        "body": Binary(b"[[], {}, {}]"),
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": "{}",
        "correlation_id": None,
        "reply_to": None,
        "published_at": now,
        **fields,
    }
    broker.collection.insert_one(doc)


BAD: dict[str, dict[str, Any]] = {
    "headers-not-json": {"headers": "nope"},
    "headers-a-list": {"headers": "[1, 2]"},
    "headers-a-subdocument": {"headers": {"task": "t"}},
    "id-a-map": {"message_id": {"$ne": None}},
    "id-a-number": {"message_id": 42},
    "body-a-string": {"body": "text"},
    "priority-text": {"priority": "high"},
    "content-type-missing": {"content_type": None},
}


def _plant(broker: MongoDBBroker, queue: str) -> list[str]:
    """good-0, bad, good-1, bad, ...: returns the good ids in claim order."""
    goods = []
    for i, (kind, fields) in enumerate(BAD.items()):
        goods.append(f"good-{i}")
        _insert(broker, queue, message_id=goods[-1])
        _insert(broker, queue, **{"message_id": f"bad-{kind}", **fields})
    goods.append("good-last")
    # A document id that is itself a map: still a message, compared with $eq on ack.
    _insert(broker, queue, _id={"odd": "id", "n": 1}, message_id="good-last")
    return goods


def _drain(broker: MongoDBBroker, queue: str, limit: int) -> list[Delivery]:
    got: list[Delivery] = []
    while batch := broker.receive(queue, max_messages=limit, timeout=0.3):
        got += batch
    return got


@pytest.mark.parametrize("limit", [1, 50], ids=["one-per-claim", "batch-claims"])
def test_bad_documents_between_good_ones_are_dead_lettered_and_the_good_ones_returned(
    make: Make, queue: str, limit: int
) -> None:
    broker = make()
    goods = _plant(broker, queue)
    got = _drain(broker, queue, limit)
    # FIFO follows _id: a map id sorts before every ObjectId (BSON order), the rest in order.
    assert [d.envelope.id for d in got] == [goods[-1], *goods[:-1]]
    for delivery in got:
        broker.ack(delivery)
    dead = _drain(broker, broker.dead_letter_queue(queue), 50)
    assert len(dead) == len(BAD)
    for d in dead:
        assert d.envelope.content_type == UNDECODABLE_CONTENT_TYPE
        assert d.envelope.headers[DEAD_LETTER_REASON_HEADER].startswith("undecodable message")
        assert d.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
        assert set(d.envelope.headers[ORIGINAL_HEADER]) >= {"message_id", "headers"}
        broker.ack(d)
    assert broker.collection.count_documents({"queue": queue}) == 0


def test_a_delivery_count_that_is_not_a_number_no_longer_blocks_every_claim(
    make: Make, queue: str
) -> None:
    # $inc on it fails, so before this every claim that picked it (the oldest, first in
    # line) raised OperationalError: the whole queue stood still.
    broker = make()
    _insert(broker, queue, message_id="blocker", delivery_count="many")
    _insert(broker, queue, message_id="behind")
    [got] = broker.receive(queue, max_messages=10, timeout=1)
    assert got.envelope.id == "behind"
    broker.ack(got)
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    assert dead.envelope.id == "blocker"
    assert "delivery_count" in dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    broker.ack(dead)
    _insert(broker, queue, message_id="blocker-2", delivery_count=[1])
    _insert(broker, queue, message_id="behind-2")
    [got] = broker.receive(queue, max_messages=1, timeout=1)
    assert got.envelope.id == "behind-2"
    broker.ack(got)


def test_a_document_whose_queue_is_an_array_is_not_mistaken_for_a_message(
    make: Make, queue: str
) -> None:
    # {"queue": q} matches an array that contains q: such a document is claimed, but it is
    # not one of ours, and its "queue" is not a queue name.
    broker = make()
    _insert(broker, queue, **{"message_id": "array", "queue": [queue, "elsewhere"]})
    assert broker.receive(queue, max_messages=5, timeout=0.3) == []
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    assert dead.envelope.id == "array"
    broker.ack(dead)


def test_an_envelope_id_must_be_a_string(make: Make, queue: str) -> None:
    broker = make()
    for bad in ({"$ne": None}, 42, None):
        with pytest.raises(ConfigurationError, match="id must be a str"):
            broker.publish(Envelope(id=bad, body=b"{}"), queue=queue)  # type: ignore[arg-type]
    assert broker.collection.count_documents({"queue": queue}) == 0


ODD_REASONS = [
    "x" * 1_000_000,
    "nul\x00bell\x07 del\x7f c1\x85",
    "lone \ud800 surrogate",
    ValueError("an exception"),
]


@pytest.mark.parametrize("reason", ODD_REASONS, ids=range(len(ODD_REASONS)))
def test_dead_letter_reasons_are_recorded_bounded_and_never_raise(
    make: Make, queue: str, reason: object
) -> None:
    broker = make()
    broker.publish(Envelope(id="r", body=b"{}"), queue=queue)
    [got] = broker.receive(queue, timeout=1)
    broker.reject(got, requeue=False, reason=reason)  # type: ignore[arg-type]
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    recorded = dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert isinstance(recorded, str)
    assert len(recorded) <= MAX_REASON_CHARS
    recorded.encode("utf-8")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in recorded)
    broker.ack(dead)


@pytest.mark.parametrize("delay", [1e12, 1e15, 1e300])
def test_a_delay_past_the_year_9999_is_refused_at_publish(
    make: Make, queue: str, delay: float
) -> None:
    broker = make()
    with pytest.raises(ConfigurationError, match="year 10000"):
        broker.publish(Envelope(id="d", body=b"{}"), queue=queue, delay=delay)
    with pytest.raises(ConfigurationError, match="year 10000"):
        broker.publish_many([Envelope(id="d", body=b"{}")], queue=queue, delay=delay)
    assert broker.collection.count_documents({"queue": queue}) == 0


# ============================================================================ URL options


def test_unknown_options_are_found_in_pymongos_table_not_in_its_error_text() -> None:
    with pytest.raises(ConfigurationError, match="Did you mean 'lease_seconds'") as info:
        MongoDBBroker.from_url("mongodb://u:s3cret@127.0.0.1:1/db?w=1&lease_secnds=5")
    assert "lease_secnds" in str(info.value)
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError, match="Did you mean 'replicaset'"):
        MongoDBBroker.from_url("mongodb://127.0.0.1:1/db?replicaSett=rs0")
    for fine in ("replicaSet=rs0", "SSL=false", "w=majority&journal=true", "appName=x"):
        MongoDBBroker.from_url(f"mongodb://127.0.0.1:1/db?{fine}").close()


def test_without_pymongos_table_each_key_is_tried_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mongodb.driver_option_names() is not None  # this pymongo has one
    monkeypatch.setattr(mongodb, "driver_option_names", lambda: None)
    with pytest.raises(ConfigurationError, match="Did you mean 'lease_seconds'"):
        MongoDBBroker.from_url("mongodb://127.0.0.1:1/db?w=1&lease_secnds=5")
    MongoDBBroker.from_url("mongodb://127.0.0.1:1/db?w=1&lease_seconds=5").close()


def test_a_bad_driver_value_is_refused_with_the_password_masked() -> None:
    with pytest.raises(ConfigurationError) as info:
        MongoDBBroker.from_url("mongodb://u:s3cret@127.0.0.1:1/db?w=majority&journal=maybe")
    assert "s3cret" not in str(info.value)
    assert "journal" in str(info.value)


@pytest.mark.parametrize("limit", [1, 10], ids=["one-per-claim", "batch-claims"])
def test_a_planted_count_below_0_restarts_at_1_and_one_that_cannot_grow_stays(
    make: Make, queue: str, limit: int
) -> None:
    # Below 0 it would lift worker_max_deliveries; at 2**63-1 the $inc of every claim of the
    # queue failed (the whole queue stood still).
    broker = make()
    _insert(broker, queue, message_id="negative", delivery_count=-1_000_000)
    _insert(broker, queue, message_id="stuck", delivery_count=Int64(2**63 - 1))
    _insert(broker, queue, message_id="good")
    seen: dict[str, list[int | None]] = {}
    for _ in range(2):  # delivered, given back, delivered again
        got = _drain_n(broker, queue, limit, 3)
        assert sorted(d.envelope.id for d in got) == ["good", "negative", "stuck"]
        for delivery in got:
            seen.setdefault(delivery.envelope.id, []).append(delivery.delivery_count)
            broker.reject(delivery, requeue=True)
    assert seen == {"negative": [1, 2], "stuck": [2**63 - 1] * 2, "good": [1, 2]}


def _drain_n(broker: MongoDBBroker, queue: str, limit: int, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < n and (batch := broker.receive(queue, max_messages=limit, timeout=1)):
        got += batch
    return got

"""``conveyor._drivers.mongodb.translate_error`` on the MongoDB-protocol test server
(issue 13, class 1), for the broker and the result backend alike: a stored document that
cannot be read (a UUID of the wrong size) is a ``DecodeError``, not "cannot be stored"; text
BSON cannot hold (a lone surrogate) is an ``EncodeError`` on every path, never a raw
``UnicodeEncodeError``; a lost server is still transient. Classified by exception class,
never by message text."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bson import Binary
from bson.errors import InvalidBSON
from support.mongo import mongodb_url, unreachable_mongodb_url  # noqa: F401 - a fixture

from conveyor._drivers.mongodb import translate_error
from conveyor.backends.mongodb import MongoDBResultBackend
from conveyor.core.errors import (
    ConnectionLost,
    DecodeError,
    EncodeError,
    OperationalError,
)
from conveyor.core.types import Envelope, ResultRecord, State
from conveyor.testing.support import unique_name
from conveyor.transports.mongodb import MongoDBBroker


@pytest.fixture
def backend(mongodb_url: str) -> Iterator[MongoDBResultBackend]:  # noqa: F811
    made = MongoDBResultBackend.from_url(mongodb_url)
    yield made
    made.close()


@pytest.fixture
def broker(mongodb_url: str) -> Iterator[MongoDBBroker]:  # noqa: F811
    made = MongoDBBroker.from_url(mongodb_url)
    yield made
    made.close()


def test_a_stored_result_that_cannot_be_read_is_a_decode_error(
    mongodb_url: str,  # noqa: F811
    backend: MongoDBResultBackend,
) -> None:
    """A UUID of 3 bytes (another writer's) read by a client that decodes UUIDs: pymongo
    raises InvalidBSON. Before, that was an EncodeError saying it "cannot be stored"."""
    task_id = unique_name("baduuid")
    backend._tasks.insert_one({"_id": task_id, "status": "SUCCESS", "result": Binary(b"abc", 4)})
    sep = "&" if "?" in mongodb_url else "?"
    reader = MongoDBResultBackend.from_url(f"{mongodb_url}{sep}uuidRepresentation=standard")
    try:
        with pytest.raises(DecodeError, match="cannot be read"):
            reader.fetch(task_id)
    finally:
        reader.close()
        backend._tasks.delete_one({"_id": task_id})


def test_text_bson_cannot_hold_is_an_encode_error_for_the_backend(
    backend: MongoDBResultBackend,
) -> None:
    record = ResultRecord(unique_name("sur"), State.FAILURE, None, traceback="lone \udcff")
    with pytest.raises(EncodeError):
        backend.store(record)


def test_text_bson_cannot_hold_is_an_encode_error_for_the_broker(broker: MongoDBBroker) -> None:
    """Headers with a lone surrogate: before, a raw UnicodeEncodeError left publish."""
    queue = unique_name("sur")
    envelope = Envelope(id="x", body=b"{}", headers={"task": "t", "note": "lone \udcff"})
    try:
        with pytest.raises(EncodeError):
            broker.publish(envelope, queue=queue)
        with pytest.raises(EncodeError):
            broker.publish_many([envelope], queue=queue)
        assert broker.size(queue) == 0
    finally:
        broker.purge(queue)


def test_the_translation_is_by_class() -> None:
    """The same classes whatever pymongo's wording."""
    url = "mongodb://u:s3cret@h/db"
    assert type(translate_error(InvalidBSON("x"), what="r", url=url)) is DecodeError
    decode = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert type(translate_error(decode, what="r", url=url)) is DecodeError
    encode = UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
    assert type(translate_error(encode, what="w", url=url)) is EncodeError
    text = str(translate_error(InvalidBSON("password=s3cret"), what="r", url=url))
    assert "s3cret" not in text


def test_an_unreachable_server_is_still_transient() -> None:
    broker = MongoDBBroker.from_url(unreachable_mongodb_url(), server_selection_timeout=0.5)
    try:
        with pytest.raises(OperationalError) as info:
            broker.publish(Envelope(id="x", body=b"{}"), queue="q")
        assert isinstance(info.value, ConnectionLost)
    finally:
        broker.close()

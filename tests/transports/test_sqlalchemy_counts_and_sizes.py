"""Issue 13 on the SQL broker (every selected database): a planted ``delivery_count`` never
lifts ``worker_max_deliveries`` (below 0 it restarts at 1) and never stops the queue (at the
column's maximum it stays there instead of overflowing every claim); text the database cannot
encode and statements over MariaDB's ``max_allowed_packet`` are refused at publish with
``EncodeError`` (typed, not transient), never a raw ``UnicodeEncodeError`` or a "gone away".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import SqlTarget, sql_target  # noqa: F401 - sql_target is a fixture

from conveyor.core.errors import EncodeError
from conveyor.core.types import Envelope
from conveyor.testing.support import unique_name
from conveyor.transports.sqlalchemy import SQLAlchemyBroker

INT32_MAX = 2**31 - 1


@pytest.fixture
def broker(sql_target: SqlTarget) -> Iterator[SQLAlchemyBroker]:  # noqa: F811
    made = SQLAlchemyBroker.from_url(f"sqla+{sql_target.url}")
    yield made
    made.close()


@pytest.fixture
def queue(broker: SQLAlchemyBroker) -> Iterator[str]:
    name = unique_name("sqlcount")
    broker.declare_queue(name)
    yield name
    for q in (name, broker.dead_letter_queue(name)):
        broker.purge(q)


def _plant(broker: SQLAlchemyBroker, queue: str, envelope_id: str, count: Any) -> None:
    """A row written behind the broker's back with its own delivery_count."""
    values = {
        "queue": queue, "priority": 0, "delayed": False, "not_before": 0.0,
        "lease_expires": 0.0, "delivery_count": count, "envelope_id": envelope_id,
        "body": b"[[], {}, {}]", "content_type": "application/json",
        "content_encoding": "utf-8", "headers": "{}", "published_at": time.time(),
    }  # fmt: skip
    quote = broker.engine.dialect.identifier_preparer.quote  # "delayed" is a MySQL keyword
    names = ", ".join(quote(k) for k in values)
    marks = ", ".join(f":{k}" for k in values)
    with broker.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO conveyor_message ({names}) VALUES ({marks})"), values)


@pytest.mark.parametrize("limit", [1, 50], ids=["one-per-claim", "batch-claims"])
def test_a_planted_count_below_0_restarts_at_1_and_one_at_the_maximum_stays(
    broker: SQLAlchemyBroker, queue: str, limit: int
) -> None:
    _plant(broker, queue, "negative", -1_000_000)
    _plant(broker, queue, "stuck", INT32_MAX)
    broker.publish(Envelope(id="good", body=b"{}"), queue=queue)
    seen: dict[str, list[int | None]] = {}
    for _ in range(3):  # three rounds: each message delivered, then given back
        got = []
        while len(got) < 3 and (batch := broker.receive(queue, max_messages=limit, timeout=1)):
            got += batch
        assert sorted(d.envelope.id for d in got) == ["good", "negative", "stuck"]
        for delivery in got:
            seen.setdefault(delivery.envelope.id, []).append(delivery.delivery_count)
            broker.reject(delivery, requeue=True)
    assert seen == {"negative": [1, 2, 3], "stuck": [INT32_MAX] * 3, "good": [1, 2, 3]}


ODD_TEXT = {
    "envelope-id": Envelope(id="\ud800-y", body=b"{}"),
    "correlation-id": Envelope(id="z", body=b"{}", correlation_id="\udfff"),
    "header-value": Envelope(id="w", body=b"{}", headers={"k": "a\udfffb"}),
    "reply-to": Envelope(id="v", body=b"{}", reply_to="r\ud800"),
}


@pytest.mark.parametrize("kind", list(ODD_TEXT))
def test_text_utf8_cannot_encode_is_refused_at_publish_with_encode_error(
    broker: SQLAlchemyBroker, queue: str, kind: str
) -> None:
    with pytest.raises(EncodeError, match="cannot be encoded"):
        broker.publish(ODD_TEXT[kind], queue=queue)
    with pytest.raises(EncodeError):
        broker.publish_many([Envelope(id="fine", body=b"{}"), ODD_TEXT[kind]], queue=queue)
    broker.publish(Envelope(id="after", body=b"{}"), queue=queue)
    [got] = broker.receive(queue, max_messages=10, timeout=1)  # nothing of the batch landed
    assert got.envelope.id == "after"
    broker.ack(got)


def test_a_message_over_max_allowed_packet_is_refused_with_encode_error(
    broker: SQLAlchemyBroker,
    queue: str,
    sql_target: SqlTarget,  # noqa: F811
) -> None:
    if sql_target.dialect != "mysql":
        pytest.skip("max_allowed_packet is MariaDB's/MySQL's")
    with broker.engine.connect() as conn:
        packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
    # Escaped by the driver ('\0' is sent as two bytes): over the limit though the raw body
    # is not, so the guard must count what is sent, not the value's length.
    body = b"\x00" * (packet // 2 + 1024)
    with pytest.raises(EncodeError, match="max_allowed_packet"):
        broker.publish(Envelope(id="huge", body=body), queue=queue)
    with pytest.raises(EncodeError, match="max_allowed_packet"):
        broker.publish_many([Envelope(id="huge", body=body)], queue=queue)
    fits = b"x" * (packet // 4)
    broker.publish(Envelope(id="fits", body=fits), queue=queue)  # the connection still serves
    [got] = broker.receive(queue, timeout=1)
    assert (got.envelope.id, got.envelope.body) == ("fits", fits)
    broker.ack(got)

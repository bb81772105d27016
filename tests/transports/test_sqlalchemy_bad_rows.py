"""Issue 13 on the SQL broker (every selected database): rows another writer left in the
message table never stop a consumer, never come back and never hide the good ones;
dead-letter reasons are recorded whatever they are; delays a double cannot hold are refused;
URL keys that are neither conveyor's nor the driver's fail at once with a suggestion.

Bad rows are written with plain SQL ``INSERT`` statements on the broker's own table, as a
buggy or foreign writer would leave them (before this, a row whose headers were not a JSON
map made every ``receive`` raise, and the row came back when its lease ran out: forever).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import SqlTarget, sql_target  # noqa: F401 - sql_target is a fixture

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.core.errors import ConfigurationError
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.support import unique_name
from conveyor.transports._common import (
    EXACT_MS_MAX_DELAY,
    MAX_REASON_CHARS,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
)
from conveyor.transports.sqlalchemy import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    SQLAlchemyBroker,
    SQLAlchemyBrokerOptions,
)

Make = Callable[..., SQLAlchemyBroker]


@pytest.fixture
def make(sql_target: SqlTarget) -> Iterator[Make]:  # noqa: F811
    made: list[SQLAlchemyBroker] = []
    keeper = SQLAlchemyBroker.from_url(f"sqla+{sql_target.url}") if sql_target.memory else None

    def build(**options: Any) -> SQLAlchemyBroker:
        if keeper is not None:
            broker = SQLAlchemyBroker(keeper.engine, SQLAlchemyBrokerOptions(**options))
        else:
            broker = SQLAlchemyBroker.from_url(f"sqla+{sql_target.url}", **options)
        made.append(broker)
        return broker

    yield build
    for broker in reversed(made):
        broker.close()
    if keeper is not None:
        keeper.close()


@pytest.fixture
def queue(make: Make) -> Iterator[str]:
    name = unique_name("sqlbad")
    yield name
    cleaner = make()
    for q in (name, cleaner.dead_letter_queue(name)):
        cleaner.purge(q)


def _insert(broker: SQLAlchemyBroker, queue: str, **row: Any) -> None:
    """One row written behind the broker's back, with plain SQL."""
    broker.declare_queue(queue)  # creates the table
    values = {
        "queue": queue,
        "priority": 0,
        "delayed": False,
        "not_before": 0.0,
        "lease_expires": 0.0,
        "delivery_count": 0,
        "envelope_id": unique_name("row"),
        "body": b"[[], {}, {}]",
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": "{}",
        "published_at": time.time(),
        **row,
    }
    quote = broker.engine.dialect.identifier_preparer.quote  # "delayed" is a MySQL keyword
    names = ", ".join(quote(k) for k in values)
    marks = ", ".join(f":{k}" for k in values)
    with broker.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO conveyor_message ({names}) VALUES ({marks})"), values)


BAD_HEADERS = {
    "not-json": "not json at all",
    "a-list": "[1, 2]",
    "null": "null",
    "a-string": '"text"',
    "truncated": '{"task": "t", ',
    "nested-too-deep": "[" * 100_000 + "]" * 100_000,
    "empty": "",
}


def _drain(broker: SQLAlchemyBroker, queue: str) -> list[Delivery]:
    got: list[Delivery] = []
    while batch := broker.receive(queue, max_messages=50, timeout=0.2):
        got += batch
    return got


def test_bad_rows_between_good_ones_are_dead_lettered_and_the_batch_is_returned(
    make: Make,
    queue: str,
    sql_target: SqlTarget,  # noqa: F811
) -> None:
    broker = make()
    bad: dict[str, dict[str, Any]] = {k: {"headers": v} for k, v in BAD_HEADERS.items()}
    if sql_target.dialect == "sqlite":  # SQLite keeps text in BLOB and INTEGER columns
        bad["body-is-text"] = {"body": "not bytes"}
        bad["priority-is-text"] = {"priority": "high"}
    goods = [f"good-{i}" for i in range(len(bad) + 1)]
    _insert(broker, queue, envelope_id=goods[0], headers='{"id": "good-0"}')
    for (kind, row), good in zip(bad.items(), goods[1:], strict=True):
        _insert(broker, queue, **{"envelope_id": f"bad-{kind}", **row})
        _insert(broker, queue, envelope_id=good, headers=json.dumps({"id": good}))
    # An out-of-range priority is clamped, not refused: it is still a message.
    _insert(broker, queue, envelope_id="loud", priority=42, headers="{}")

    got = broker.receive(queue, max_messages=100, timeout=1)
    assert [d.envelope.id for d in got] == ["loud", *goods]
    assert got[0].envelope.priority == 9
    for delivery in got:
        broker.ack(delivery)

    dead = _drain(broker, broker.dead_letter_queue(queue))
    assert sorted(d.envelope.id for d in dead) == sorted(f"bad-{k}" for k in bad)
    for d in dead:
        assert d.envelope.content_type == UNDECODABLE_CONTENT_TYPE
        assert d.envelope.headers[DEAD_LETTER_REASON_HEADER].startswith("undecodable message")
        assert d.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
        original = d.envelope.headers[ORIGINAL_HEADER]
        if d.envelope.id[4:] in BAD_HEADERS:
            assert original["headers"] == BAD_HEADERS[d.envelope.id[4:]]
        broker.ack(d)
    assert broker.receive(queue, max_messages=100, timeout=0.3) == []
    assert broker.size(queue) == 0


def test_a_claim_of_only_bad_rows_returns_nothing_and_leaves_nothing_to_come_back(
    make: Make, queue: str
) -> None:
    broker = make()
    for text in BAD_HEADERS.values():
        _insert(broker, queue, headers=text)
    assert broker.receive(queue, max_messages=1, timeout=0) == []
    assert broker.receive(queue, max_messages=100, timeout=0) == []
    # Every row moved in the claim that found it: none is left held, to come back later.
    assert _rows(broker, queue) == 0
    assert _rows(broker, broker.dead_letter_queue(queue)) == len(BAD_HEADERS)
    assert len(_drain(broker, broker.dead_letter_queue(queue))) == len(BAD_HEADERS)


def _rows(broker: SQLAlchemyBroker, queue: str) -> int:
    with broker.engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT COUNT(*) FROM conveyor_message WHERE queue = :q"), {"q": queue}
        ).scalar_one()
    return int(count)


ODD_REASONS = [
    "x" * 1_000_000,
    "nul\x00bell\x07 esc\x1b[31m del\x7f c1\x85",
    "lone \ud800 surrogate \udfff",
    "\u00e9\u4e2d\U0001f600 fine text stays",
    ValueError("an exception, not a string"),
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
    if isinstance(reason, str) and reason.startswith("\u00e9"):
        assert recorded == reason
    broker.ack(dead)


@pytest.mark.parametrize("delay", [EXACT_MS_MAX_DELAY * 2, 1e300])
def test_a_delay_a_double_cannot_hold_is_refused_at_publish(
    make: Make, queue: str, delay: float
) -> None:
    broker = make()
    with pytest.raises(ConfigurationError, match="longer than the SQL broker can hold"):
        broker.publish(Envelope(id="d", body=b"{}"), queue=queue, delay=delay)
    with pytest.raises(ConfigurationError):
        broker.publish_many([Envelope(id="d", body=b"{}")], queue=queue, delay=delay)
    broker.publish(Envelope(id="far", body=b"{}"), queue=queue, delay=EXACT_MS_MAX_DELAY)
    assert broker.receive(queue, timeout=0.2) == []
    assert broker.purge(queue) == 1


def _typo_urls(target: SqlTarget) -> tuple[str, str, str]:
    """(conveyor-option typo, driver-option typo and its fix, a valid driver key)."""
    if target.dialect == "postgresql":
        return "lease_secnds=5", "sslmod=disable", "sslmode=disable&application_name=conveyor"
    if target.dialect == "mysql":
        return "lease_secnds=5", "charsett=utf8mb4", "charset=utf8mb4&ssl_ca=/nowhere"
    return "lease_secnds=5", "timout=5", "timeout=5"


def test_unknown_url_keys_fail_at_once_with_a_suggestion(
    sql_target: SqlTarget,  # noqa: F811
) -> None:
    if sql_target.memory:
        pytest.skip("the same dialect as the SQLite file target")
    ours, theirs, valid = _typo_urls(sql_target)
    base = f"sqla+{sql_target.url}"
    with pytest.raises(ConfigurationError, match="Did you mean 'lease_seconds'"):
        SQLAlchemyBroker.from_url(f"{base}?{ours}")
    fixed = theirs.split("=")[0][:-1] if theirs.startswith("sslmod=") else None
    with pytest.raises(ConfigurationError, match="Did you mean") as info:
        SQLAlchemyBroker.from_url(f"{base}?{theirs}")
    if fixed:
        assert "'sslmode'" in str(info.value)
    with pytest.raises(ConfigurationError, match="Did you mean 'default_ttl'"):
        SQLAlchemyResultBackend.from_url(f"db+{sql_target.url}?default_tt=5")
    SQLAlchemyBroker.from_url(f"{base}?{valid}&lease_seconds=5").close()

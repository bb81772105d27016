"""Issue 13 on the Redis broker: malformed envelopes planted in a ready list never stop a
consumer, never come back and never hide the good ones; dead-letter reasons are recorded
whatever they are; delays the server cannot hold are refused at publish.

The bad envelopes are written with the driver (``LPUSH``), exactly as a foreign producer (a
bug, another client library, an attacker with access to the server) would leave them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from support.redis import REDIS_URL, delete_keys, require_redis

from conveyor.core.errors import ConfigurationError
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.support import unique_name
from conveyor.transports._common import (
    EXACT_MS_MAX_DELAY,
    MAX_REASON_CHARS,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
)
from conveyor.transports.redis import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    RedisBroker,
    encode_envelope,
)


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def queue(server: redis.Redis) -> Iterator[str]:
    name = unique_name("redis-bad")
    yield name
    delete_keys(server, f"*{name}*")


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    b = RedisBroker.from_url(REDIS_URL)
    yield b
    b.close()


def _good(name: str, queue: str) -> tuple[str, bytes]:
    env = Envelope(id=name, body=b"[[], {}, {}]", headers={"task": "t", "id": name})
    return name, encode_envelope(env, queue, 0).encode()


def _kombu(headers: str = '{"id": "x"}', **props: str) -> bytes:
    properties = ", ".join(f'"{k}": {v}' for k, v in {"body_encoding": '"base64"', **props}.items())
    return (
        '{"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json", '
        f'"headers": {headers}, "properties": {{{properties}}}}}'
    ).encode()


BAD: dict[str, bytes] = {
    "not-json": b"\xffnot json",
    "infinity-priority": _kombu(priority="Infinity"),
    "nan-priority": _kombu(priority="NaN"),
    "text-priority": _kombu(priority='"high"'),
    "headers-list": _kombu(headers="[]"),
    "headers-null": _kombu(headers="null"),
    "headers-after-an-object": (
        b'{"properties": {"headers": {}}, "headers": {"id": "n"}, "body": "e30=", '
        b'"content-type": "application/json"}'
    ),
    "bad-base64": _kombu().replace(b'"e30="', b'"!!!"'),
    "body-a-number": _kombu().replace(b'"e30="', b"42"),
    "content-type-a-map": _kombu().replace(b'"application/json"', b"{}"),
    "correlation-id-a-map": _kombu(correlation_id="{}"),
    "a-json-array": b"[1, 2, 3]",
    "nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
    "empty": b"",
}


def _drain(broker: RedisBroker, queue: str, limit: int = 50) -> list[Delivery]:
    got: list[Delivery] = []
    while True:
        batch = broker.receive(queue, max_messages=limit, timeout=0.2)
        if not batch:
            return got
        got += batch


def test_bad_envelopes_between_good_ones_are_dead_lettered_and_the_batch_is_returned(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    goods = [_good(f"good-{i}", queue) for i in range(len(BAD) + 1)]
    planted = [goods[0]]
    for (_kind, raw), good in zip(BAD.items(), goods[1:], strict=True):
        planted += [("bad", raw), good]
    for _name, raw in planted:
        server.lpush(queue, raw)  # kombu's order: LPUSH, consumers pop from the right

    # One claim of everything: no exception, every good message, in order, nothing else.
    got = broker.receive(queue, max_messages=100, timeout=1)
    assert [d.envelope.id for d in got] == [name for name, _ in goods]
    for delivery in got:
        broker.ack(delivery)

    # Every bad one is in the dead-letter queue, once, readable, with its reason and its text.
    dead = _drain(broker, broker.dead_letter_queue(queue))
    assert sorted(d.envelope.body for d in dead) == sorted(BAD.values())
    for d in dead:
        assert d.envelope.content_type == UNDECODABLE_CONTENT_TYPE
        assert d.envelope.headers[DEAD_LETTER_REASON_HEADER].startswith("undecodable message")
        assert d.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
        broker.ack(d)

    # Nothing comes back: no lease left behind, nothing ready, nothing delayed.
    assert broker.receive(queue, max_messages=100, timeout=0.3) == []
    assert server.hlen(f"conveyor:{{{queue}}}:leases") == 0
    assert broker.size(queue) == 0


def test_one_bad_envelope_per_claim_never_raises_and_is_dead_lettered_at_once(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    for raw in BAD.values():
        server.lpush(queue, raw)
    assert broker.receive(queue, timeout=0) == []  # the claim found only bad ones
    for _ in range(len(BAD)):
        assert broker.receive(queue, max_messages=1, timeout=0) == []
    assert server.llen(queue) == 0
    assert len(_drain(broker, broker.dead_letter_queue(queue))) == len(BAD)


def test_the_reason_names_what_was_wrong(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    server.lpush(queue, BAD["infinity-priority"])
    assert broker.receive(queue, timeout=0) == []
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    reason = dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert "priority inf is not an integer" in reason, reason
    broker.ack(dead)


def test_a_compact_json_envelope_is_counted_across_redeliveries(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    # Another JSON writer without spaces: the redelivery mark must still land in "headers".
    _, raw = _good("compact", queue)
    server.lpush(queue, json.dumps(json.loads(raw), separators=(",", ":")))
    counts = []
    for _ in range(3):
        consumer = RedisBroker.from_url(REDIS_URL)
        [got] = consumer.receive(queue, timeout=1)
        counts.append((got.redelivered, got.delivery_count))
        consumer.close()  # gives it back, marked
    assert counts == [(False, 1), (True, 2), (True, 3)]
    [last] = broker.receive(queue, timeout=1)
    assert dict(last.envelope.headers) == {"task": "t", "id": "compact"}
    broker.ack(last)


def test_an_envelope_with_its_own_delivery_count_header_is_dead_lettered_once_redelivered(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    # JSON keeps the last of duplicate keys, so a sender's own "x-delivery-count" would
    # shadow conveyor's mark and freeze the count: the message would loop without limit.
    server.lpush(queue, _kombu(headers='{"id": "own", "x-delivery-count": 0}'))
    first = RedisBroker.from_url(REDIS_URL)
    [got] = first.receive(queue, timeout=1)
    assert got.delivery_count == 1
    first.close()  # released: now it carries two counts
    assert broker.receive(queue, timeout=0.3) == []
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    assert "x-delivery-count" in dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    broker.ack(dead)


def test_an_envelope_with_two_headers_members_is_dead_lettered_once_redelivered(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    # JSON keeps the last of two "headers"; the marks would go into the first one, so the
    # message would come back uncounted forever.
    server.lpush(queue, b'{"body": "", "headers": {"a": 1}, "properties": {}, "headers": {"b": 2}}')
    first = RedisBroker.from_url(REDIS_URL)
    [got] = first.receive(queue, timeout=1)
    assert dict(got.envelope.headers) == {"b": 2}
    first.close()
    assert broker.receive(queue, timeout=0.3) == []
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    assert "more than one headers" in dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    broker.ack(dead)


ODD_REASONS = [
    "x" * 1_000_000,
    "nul\x00bell\x07 esc\x1b[31m del\x7f c1\x85",
    "lone \ud800 surrogate \udfff",
    "line\nbreaks\r\nand\ttabs",
    "",
    "\u00e9\u4e2d\U0001f600 fine text stays",
    ValueError("an exception, not a string"),
    12345,
]


@pytest.mark.parametrize("reason", ODD_REASONS, ids=range(len(ODD_REASONS)))
def test_dead_letter_reasons_are_recorded_bounded_and_never_raise(
    broker: RedisBroker, queue: str, reason: object
) -> None:
    broker.publish(Envelope(id="r", body=b"{}", headers={"id": "r"}), queue=queue)
    [got] = broker.receive(queue, timeout=1)
    broker.reject(got, requeue=False, reason=reason)  # type: ignore[arg-type]
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    recorded = dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert isinstance(recorded, str)
    assert len(recorded) <= MAX_REASON_CHARS
    recorded.encode("utf-8")  # no lone surrogate survives
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in recorded)
    if reason == "\u00e9\u4e2d\U0001f600 fine text stays":
        assert recorded == reason
    assert ORIGINAL_HEADER not in dead.envelope.headers
    broker.ack(dead)


@pytest.mark.parametrize("delay", [EXACT_MS_MAX_DELAY * 2, 1e300])
def test_a_delay_the_sorted_set_cannot_hold_is_refused_at_publish(
    broker: RedisBroker, queue: str, delay: float
) -> None:
    with pytest.raises(ConfigurationError, match="longer than the Redis broker can hold"):
        broker.publish(Envelope(id="d", body=b"{}"), queue=queue, delay=delay)
    with pytest.raises(ConfigurationError):
        broker.publish_many([Envelope(id="d", body=b"{}")], queue=queue, delay=delay)
    assert broker.purge(queue) == 0


def test_the_longest_delay_is_accepted_and_held(broker: RedisBroker, queue: str) -> None:
    broker.publish(Envelope(id="far", body=b"{}"), queue=queue, delay=EXACT_MS_MAX_DELAY)
    assert broker.receive(queue, timeout=0.2) == []
    assert broker.purge(queue) == 1

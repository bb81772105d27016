"""Issue 13 on RabbitMQ: messages with odd properties never stop a consumer, never come back
and never hide the good ones; classic queues count deliveries so ``worker_max_deliveries``
holds (also across SIGKILLed consumer processes); dead-letter reasons are recorded whatever
they are; headers and delays RabbitMQ cannot take are refused at publish, non-transiently.

Odd messages are published with pika and hand-encoded properties (RabbitMQ accepts and
delivers them as they are): text that is not UTF-8, a field table nested deeper than pika
can decode, a timestamp past the year 9999. Before this, the last two made pika raise inside
its frame parser: the connection dropped, RabbitMQ redelivered the message, and the consumer
looped on it forever without delivering anything else.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from support.amqp import (
    QueueJanitor,
    amqp_url,  # noqa: F401 - a fixture
    janitor,  # noqa: F401 - a fixture
    make_amqp_broker,  # noqa: F401 - a fixture
    rabbitmqctl,
    terminating,
)

from conveyor.core.errors import ConfigurationError, EncodeError
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports._common import MAX_REASON_CHARS, ORIGINAL_HEADER, UNDECODABLE_CONTENT_TYPE
from conveyor.transports.amqp import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DELIVERIES_HEADER,
    MAX_DELAY,
    AMQPBroker,
    parse_amqp_url,
)

C = pika.BasicProperties


class RawProperties(pika.BasicProperties):  # type: ignore[misc]
    """Properties sent exactly as given: ``flags`` and already-encoded ``pieces``."""

    def __init__(self, flags: int, *pieces: bytes) -> None:
        super().__init__()
        self._flags, self._pieces = flags, pieces

    def encode(self) -> list[bytes]:
        return [struct.pack(">H", self._flags), *self._pieces]


def _short(raw: bytes) -> bytes:
    return struct.pack("B", len(raw)) + raw


def _table(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _deep_table(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = _short(b"a") + b"F" + _table(inner)
    return _table(inner)


#: kind -> (properties, what the dead-letter reason must mention)
ODD: dict[str, tuple[Any, str]] = {
    "message-id-not-utf8": (RawProperties(C.FLAG_MESSAGE_ID, _short(b"\xff\xfe")), "message_id"),
    "header-key-not-utf8": (
        RawProperties(C.FLAG_HEADERS, _table(_short(b"\xffk") + b"V")),
        "key",
    ),
    "headers-nested-too-deep": (RawProperties(C.FLAG_HEADERS, _deep_table(3000)), "table"),
    "content-type-not-utf8": (RawProperties(C.FLAG_CONTENT_TYPE, _short(b"\xc3")), "content_type"),
}


@pytest.fixture
def raw(amqp_url: str) -> Iterator[Any]:  # noqa: F811
    endpoint = parse_amqp_url(amqp_url)[0][0]
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            host=endpoint.host,
            port=endpoint.port,
            virtual_host=endpoint.vhost,
            credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
        )
    )
    yield connection.channel()
    connection.close()


@pytest.fixture
def queue(janitor: QueueJanitor) -> str:  # noqa: F811
    name = unique_name("amqp-bad")
    janitor.queues.update({name, name + ".dead"})
    return name


def _collect(broker: AMQPBroker, queue: str, count: int, timeout: float = 15.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += broker.receive(queue, max_messages=count - len(got), timeout=0.5)
    return got


def test_odd_messages_between_good_ones_are_dead_lettered_and_the_good_ones_delivered(
    make_amqp_broker: Any,  # noqa: F811
    raw: Any,
    queue: str,
) -> None:
    broker = make_amqp_broker()
    broker.declare_queue(queue)
    goods = []
    for i, (kind, (props, _)) in enumerate(ODD.items()):
        goods.append(f"good-{i}")
        raw.basic_publish("", queue, b"g", pika.BasicProperties(message_id=goods[-1]))
        raw.basic_publish("", queue, kind.encode(), props)
    # Odd but decodable: a timestamp past 9999 (as its seconds), a priority above 9 (as 9).
    stamp = 2**62
    huge_time = RawProperties(
        C.FLAG_HEADERS | C.FLAG_MESSAGE_ID,
        _table(_short(b"when") + b"T" + struct.pack(">Q", stamp)),
        _short(b"far-future"),
    )
    raw.basic_publish("", queue, b"t", huge_time)
    raw.basic_publish("", queue, b"p", pika.BasicProperties(message_id="loud", priority=200))

    got = _collect(broker, queue, len(goods) + 2)
    assert [d.envelope.id for d in got] == [*goods, "far-future", "loud"]
    assert got[-2].envelope.headers == {"when": stamp}
    assert got[-1].envelope.priority == 9
    for delivery in got:
        broker.ack(delivery)

    dead = _collect(broker, broker.dead_letter_queue(queue), len(ODD))
    assert sorted(d.envelope.body.decode() for d in dead) == sorted(ODD)
    for d in dead:
        kind = d.envelope.body.decode()
        reason = d.envelope.headers[DEAD_LETTER_REASON_HEADER]
        assert reason.startswith("undecodable message"), reason
        assert ODD[kind][1] in reason, reason
        assert d.envelope.content_type == UNDECODABLE_CONTENT_TYPE
        assert d.envelope.headers[DEAD_LETTER_SOURCE_HEADER] == queue
        assert isinstance(d.envelope.headers[ORIGINAL_HEADER], str)
        broker.ack(d)
    # Nothing comes back, nothing loops: both queues stay empty.
    assert broker.receive(queue, max_messages=10, timeout=0.5) == []
    assert broker.size(queue) == 0
    assert broker.size(broker.dead_letter_queue(queue)) == 0


def test_headers_past_frame_max_raise_encode_error_and_keep_the_connection(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    # Before: RabbitMQ closed the whole connection (FRAME_ERROR), every held delivery was
    # lost, and the publish was retried as a transient failure until operation_timeout.
    broker = make_amqp_broker(operation_timeout=5)
    broker.publish(Envelope(id="held", body=b"{}"), queue=queue)
    [held] = _collect(broker, queue, 1)
    generation = broker.link.generation
    start = time.monotonic()
    with pytest.raises(EncodeError, match="frame_max"):
        broker.publish(Envelope(id="big", body=b"{}", headers={"h": "x" * 200_000}), queue=queue)
    assert time.monotonic() - start < 2.0
    assert broker.link.generation == generation  # the connection stayed up
    broker.ack(held)  # still a valid delivery


def test_a_dead_letter_copy_too_big_for_a_frame_is_replaced_and_never_raises(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    broker = make_amqp_broker()
    room = 131_072 - 21 - 200  # just fits, alone
    sent = Envelope(id="near-limit", body=b"body", headers={"h": "x" * room})
    broker.publish(sent, queue=queue)
    [got] = _collect(broker, queue, 1)
    broker.reject(got, requeue=False, reason="r" * 5000)  # the copy would not fit any more
    [dead] = _collect(broker, broker.dead_letter_queue(queue), 1)
    assert (dead.envelope.id, dead.envelope.body) == (sent.id, sent.body)
    assert dead.envelope.headers[DEAD_LETTER_REASON_HEADER] == "r" * (MAX_REASON_CHARS - 3) + "..."
    assert "h" not in dead.envelope.headers
    assert dead.envelope.headers[ORIGINAL_HEADER].startswith("{'h': 'xxx")
    broker.ack(dead)


ODD_REASONS = [
    "x" * 1_000_000,
    "nul\x00bell\x07 esc\x1b[31m del\x7f c1\x85",
    "lone \ud800 surrogate",
    "\u00e9\u4e2d\U0001f600 fine text stays",
    ValueError("an exception"),
]


@pytest.mark.parametrize("reason", ODD_REASONS, ids=range(len(ODD_REASONS)))
def test_dead_letter_reasons_are_recorded_bounded_and_never_raise(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
    reason: object,
) -> None:
    broker = make_amqp_broker()
    broker.publish(Envelope(id="r", body=b"{}"), queue=queue)
    [got] = _collect(broker, queue, 1)
    broker.reject(got, requeue=False, reason=reason)  # type: ignore[arg-type]
    [dead] = _collect(broker, broker.dead_letter_queue(queue), 1)
    recorded = dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert isinstance(recorded, str)
    assert len(recorded) <= MAX_REASON_CHARS
    recorded.encode("utf-8")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in recorded)
    if isinstance(reason, str) and reason.startswith("\u00e9"):
        assert recorded == reason
    broker.ack(dead)


@pytest.mark.parametrize("delay", [MAX_DELAY * 2, 1e300])
def test_a_delay_the_ttl_levels_cannot_hold_is_refused_at_publish(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
    delay: float,
) -> None:
    broker = make_amqp_broker()
    with pytest.raises(ConfigurationError, match="longer than the AMQP broker can hold"):
        broker.publish(Envelope(id="d", body=b"{}"), queue=queue, delay=delay)


# ============================================================================ delivery counts


def test_a_classic_queue_counts_every_give_back(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    broker = make_amqp_broker()
    sent = Envelope(id="c", body=b"{}", headers={"task": "t", "id": "c"})
    broker.publish(sent, queue=queue)
    seen = []
    for _ in range(6):
        [got] = _collect(broker, queue, 1)
        seen.append((got.redelivered, got.delivery_count))
        assert dict(got.envelope.headers) == {"task": "t", "id": "c"}  # the count is not shown
        broker.reject(got, requeue=True)
    assert seen == [(False, 1)] + [(True, n) for n in range(2, 7)]
    [last] = _collect(broker, queue, 1)
    broker.ack(last)
    assert broker.size(queue) == 0


def test_counting_costs_nothing_on_a_first_delivery_and_one_publish_on_a_redelivery(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    broker = make_amqp_broker()
    broker.publish_many([Envelope(id=f"n{i}", body=b"{}") for i in range(50)], queue=queue)
    publishes = []
    real = broker.link.publish
    broker.link.publish = lambda entries, deadline: (
        publishes.append(entries),
        real(entries, deadline),
    )
    got = _collect(broker, queue, 50)
    assert len(got) == 50
    assert publishes == []  # first deliveries: no extra round trip at all
    for delivery in got[:5]:
        broker.reject(delivery, requeue=True)
    for delivery in got[5:]:
        broker.ack(delivery)
    again = _collect(broker, queue, 5)
    assert sorted(d.delivery_count or 0 for d in again) == [2] * 5
    assert len(publishes) == 5  # one confirmed copy per redelivery
    for delivery in again:
        broker.ack(delivery)


def test_a_redelivery_whose_headers_cannot_take_the_count_is_dead_lettered_not_looped(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    broker = make_amqp_broker()
    room = 131_072 - 21  # RabbitMQ's default frame_max, less the header frame's own bytes
    probe = Envelope(id="full", body=b"{}", headers={"h": ""})
    size = sum(map(len, broker._properties(probe).encode()))
    sent = Envelope(id="full", body=b"{}", headers={"h": "x" * (room - size - 5)})
    broker.publish(sent, queue=queue)  # fits, alone
    [got] = _collect(broker, queue, 1)
    assert got.delivery_count == 1
    broker.reject(got, requeue=True)  # back it comes: its count header would not fit
    assert broker.receive(queue, timeout=1) == []
    [dead] = _collect(broker, broker.dead_letter_queue(queue), 1)
    assert "cannot be counted" in dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert dead.envelope.body == sent.body
    broker.ack(dead)
    assert broker.size(queue) == 0


def test_a_redelivery_the_full_queue_will_not_take_a_copy_of_is_handed_out_uncounted(
    make_amqp_broker: Any,  # noqa: F811
    queue: str,
) -> None:
    # max-length 1 with reject-publish (a policy: it leaves the declaration Celery's) nacks
    # the counted copy; requeueing would spin on it, so it is handed out, uncounted, once.
    policy = unique_name("conveyor-test-full")
    done = rabbitmqctl(
        "set_policy", policy, f"^{queue}$", '{"max-length": 1, "overflow": "reject-publish"}',
        "--apply-to", "queues",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        broker = make_amqp_broker(prefetch_count=1)
        broker.publish(Envelope(id="first", body=b"{}"), queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.publish(Envelope(id="second", body=b"{}"), queue=queue)  # full again
        broker.reject(got, requeue=True)
        [again] = _collect(broker, queue, 1)
        assert (again.envelope.id, again.redelivered, again.delivery_count) == ("first", True, None)
        broker.ack(again)
        [second] = _collect(broker, queue, 1)
        assert (second.envelope.id, second.delivery_count) == ("second", 1)
        broker.ack(second)
    finally:
        rabbitmqctl("clear_policy", policy)


_CONSUMER = textwrap.dedent(
    """
    import sys, time
    from conveyor.transports.amqp import AMQPBroker
    broker = AMQPBroker.from_url(sys.argv[1])
    while True:
        got = broker.receive(sys.argv[2], timeout=1)
        if got:
            print(got[0].delivery_count, got[0].redelivered, flush=True)
            time.sleep(120)  # holds it until SIGKILLed
    """
)


def test_the_count_survives_consumer_processes_killed_while_holding_the_message(
    make_amqp_broker: Any,  # noqa: F811
    amqp_url: str,  # noqa: F811
    queue: str,
) -> None:
    broker = make_amqp_broker()
    broker.publish(Envelope(id="k", body=b"{}"), queue=queue)
    seen = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, amqp_url, queue],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        with terminating(proc):
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().split()
            seen.append((int(line[0]), line[1] == "True"))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    [last] = _collect(broker, queue, 1)
    seen.append((last.delivery_count, last.redelivered))
    assert seen == [(1, False), (2, True), (3, True), (4, True)]
    broker.ack(last)


_CRASH_APP = textwrap.dedent(
    """
    import os, signal
    from conveyor import App

    app = App("crash", broker=os.environ["CRASH_BROKER"], backend="rpc://",
              worker_max_deliveries=2, worker_lease_seconds=30.0)

    @app.task(name="crash.boom", bind=True)
    def boom(self):
        fd = os.open(os.environ["CRASH_MARKERS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, (self.request.id + "\\n").encode())
        os.kill(os.getpid(), signal.SIGKILL)  # the message kills every worker that runs it
    """
)


@pytest.mark.timeout(180)
def test_a_message_that_kills_its_worker_is_dead_lettered_after_worker_max_deliveries(
    make_amqp_broker: Any,  # noqa: F811
    amqp_url: str,  # noqa: F811
    queue: str,
    tmp_path: Path,
) -> None:
    # Before: a classic queue gave no delivery count, so this message killed workers forever.
    (tmp_path / "crash_app.py").write_text(_CRASH_APP)
    markers = tmp_path / "markers.log"
    from conveyor import App

    client = App("client", broker=amqp_url, backend="rpc://")
    try:
        client.send_task("crash.boom", queue=queue)
    finally:
        client.close()
    broker = make_amqp_broker()
    dlq = broker.dead_letter_queue(queue)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
        "CRASH_BROKER": amqp_url,
        "CRASH_MARKERS": str(markers),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "conveyor.cli", "-A", "crash_app", "worker", "-P", "threads",
            "-c", "1", "-Q", queue, "-l", "warning"]  # fmt: skip
    workers = 0
    dead: list[Delivery] = []
    deadline = time.monotonic() + 120
    while not dead and time.monotonic() < deadline:
        workers += 1
        log = (tmp_path / f"worker-{workers}.log").open("wb")
        proc = subprocess.Popen(
            argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with terminating(proc):
            while proc.poll() is None and not dead and time.monotonic() < deadline:
                dead = broker.receive(dlq, timeout=0.5)
        log.close()
    runs = markers.read_text().splitlines() if markers.exists() else []
    assert dead, f"not dead-lettered after {workers} workers and {len(runs)} runs"
    assert len(runs) == 2  # worker_max_deliveries: it ran twice, the third delivery did not
    assert "delivered 3 times" in dead[0].envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert workers == 3
    broker.ack(dead[0])
    eventually(lambda: broker.size(queue) == 0, 10, message="nothing left to loop")
    assert DELIVERIES_HEADER not in dead[0].envelope.headers

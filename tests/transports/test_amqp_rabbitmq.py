"""AMQPBroker against the machine's RabbitMQ: what the conformance suite does not cover.

Celery-equal declarations (kombu declares the same queue after or before conveyor: no 406),
the exact wire format of a published task, mixed delays, reconnects (stale delivery tags are
never acked), a consume channel killed by the server (the ``consumer_timeout`` path),
failover, authentication errors, dead-lettering through a real DLX, prefetch.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pika
import pytest
from support.amqp import (
    AMQP_URL,
    UNREACHABLE_AMQP_URL,
    QueueJanitor,
    amqp_url,  # noqa: F401
    janitor,  # noqa: F401
    make_amqp_broker,  # noqa: F401
    rabbitmqctl,
)

from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    EncodeError,
    InvalidReceipt,
)
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.amqp import AMQPBroker, parse_amqp_url

Make = Callable[..., AMQPBroker]


def _env(body: bytes = b"{}", **fields: Any) -> Envelope:
    return Envelope(id=fields.pop("id", uuid.uuid4().hex), body=body, **fields)


def _queue(janitor: QueueJanitor) -> str:  # noqa: F811
    name = unique_name("amqp")
    janitor.queues.add(name)
    return name


def _collect(broker: AMQPBroker, queue: str, count: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count}"
        got += broker.receive(queue, max_messages=count - len(got), timeout=0.5)
    return got


@pytest.fixture
def raw(amqp_url: str) -> Iterator[Any]:  # noqa: F811
    """A plain pika channel to look at what is on the wire."""
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


def _kombu_declare(url: str, queue: str, **queue_options: Any) -> None:
    """Declare ``queue`` exactly as Celery's defaults do (kombu + py-amqp)."""
    with kombu.Connection(url.replace("amqp://", "pyamqp://", 1)) as connection:
        exchange = kombu.Exchange(queue, type="direct", durable=True)
        kombu.Queue(queue, exchange, routing_key=queue, **queue_options)(
            connection.default_channel
        ).declare()


# ================================================================================ declarations


@pytest.mark.parametrize(
    ("options", "kombu_options"),
    [
        ({}, {}),
        ({"max_priority": 10}, {"max_priority": 10}),
        ({"queue_type": "quorum"}, {"queue_arguments": {"x-queue-type": "quorum"}}),
    ],
    ids=["defaults", "priority", "quorum"],
)
@pytest.mark.parametrize("first", ["conveyor", "celery"])
def test_declarations_are_equivalent_to_celerys_in_either_order(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    amqp_url: str,  # noqa: F811
    options: dict[str, Any],
    kombu_options: dict[str, Any],
    first: str,
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker(**options)
    if first == "celery":
        _kombu_declare(amqp_url, queue, **kombu_options)
    broker.declare_queue(queue)
    broker.publish(_env(), queue=queue)
    _kombu_declare(amqp_url, queue, **kombu_options)  # would raise 406 if inequivalent
    assert len(_collect(broker, queue, 1)) == 1


def test_a_queue_declared_with_other_arguments_is_a_configuration_error(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    make_amqp_broker().declare_queue(queue)
    priority = make_amqp_broker(max_priority=10)
    with pytest.raises(ConfigurationError, match=r"PRECONDITION_FAILED.*x-max-priority"):
        priority.declare_queue(queue)
    # The admin channel was reopened: the broker keeps working.
    other = _queue(janitor)
    priority.publish(_env(priority=3), queue=other)
    [got] = _collect(priority, other, 1)
    assert got.envelope.priority == 3


def test_rabbitmq_shows_celerys_flags_and_no_arguments(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    make_amqp_broker().declare_queue(queue)
    listed = rabbitmqctl("list_queues", "name", "durable", "auto_delete", "exclusive", "arguments")
    row = next(line.split("\t") for line in listed.stdout.splitlines() if line.startswith(queue))
    assert row[1:] == ["true", "false", "false", "[]"]
    bindings = rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    assert f"{queue}\t{queue}\t{queue}" in bindings.stdout


# ================================================================================ wire format


def test_a_published_task_looks_like_celerys_on_the_wire(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    raw: Any,
) -> None:
    queue = _queue(janitor)
    envelope = build_envelope(
        TaskMessage(
            task="tasks.add", id=str(uuid.uuid4()), args=(2, 3), timelimit=(1.5, None), reply_to="r"
        )
    )
    make_amqp_broker().publish(envelope, queue=queue)
    method, props, body = raw.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key) == ("", queue)
    assert props.delivery_mode == 2
    assert props.priority == 0
    assert props.message_id is None  # Celery sends none: the id is in headers
    assert props.correlation_id == envelope.id
    assert props.reply_to == "r"
    assert props.content_type == "application/json"
    assert props.headers["timelimit"] == [1.5, None]
    assert props.headers["id"] == envelope.id
    assert body == envelope.body


def test_header_values_amqp_cannot_carry_are_an_encode_error(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker()
    with pytest.raises(EncodeError):
        broker.publish(_env(headers={"bad": {1, 2}}), queue=queue)
    broker.publish(_env(b"fine"), queue=queue)
    assert [d.envelope.body for d in _collect(broker, queue, 1)] == [b"fine"]


def test_a_body_over_max_message_size_is_refused_before_anything_is_sent(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    # RabbitMQ closes the connection over its max_message_size (541): refused here instead,
    # as not transient, and the rest of the batch is not sent either.
    queue = _queue(janitor)
    broker = make_amqp_broker(max_message_size=1024)
    started = time.monotonic()
    with pytest.raises(EncodeError, match="max_message_size"):
        broker.publish_many([_env(b"a"), _env(b"x" * 1025), _env(b"b")], queue=queue)
    assert time.monotonic() - started < broker.options.operation_timeout
    broker.publish(_env(b"y" * 1024), queue=queue)
    assert [d.envelope.body for d in _collect(broker, queue, 1)] == [b"y" * 1024]
    assert broker.size(queue) == 0


# ================================================================================ delays


def test_a_short_delay_published_after_a_long_one_is_delivered_first(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker()
    long, short = _env(b"60s"), _env(b"1s", headers={"task": "t"})
    broker.publish(long, queue=queue, delay=60.0)
    start = time.monotonic()
    broker.publish(short, queue=queue, delay=1.0)
    got = broker.receive(queue, timeout=5.0)
    waited = time.monotonic() - start
    assert [d.envelope for d in got] == [short]  # no x-death from the delay hops
    assert 1.0 <= waited < 3.0
    broker.ack(got[0])
    assert broker.size(queue) == 0
    assert broker.purge(queue) == 1  # the 60 s message, still in its delay level


def test_delayed_messages_survive_a_reconnect_because_they_wait_in_rabbitmq(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    producer = make_amqp_broker()
    sent = _env(b"later")
    producer.publish(sent, queue=queue, delay=1.0)
    producer.close()  # the publisher is gone; RabbitMQ holds the message
    [got] = make_amqp_broker().receive(queue, timeout=5.0)
    assert got.envelope == sent


# ================================================================================ reconnects


def _close_connection(name: str) -> None:
    listed = rabbitmqctl("list_connections", "pid", "client_properties")
    rows = [line.split("\t")[0] for line in listed.stdout.splitlines() if name in line]
    assert rows, f"connection {name} not found"
    for row in rows:
        done = rabbitmqctl("close_connection", row, "test: forced close")
        assert done.returncode == 0, done.stderr


def test_after_a_dropped_connection_stale_tags_are_never_acked_and_work_resumes(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    name = unique_name("conn")
    broker = make_amqp_broker(connection_name=name)
    sent = _env(b"held")
    broker.publish(sent, queue=queue)
    [held] = _collect(broker, queue, 1)
    generation = broker.link.generation
    _close_connection(name)
    eventually(lambda: broker.link.generation > generation, 15.0, message="reconnected")
    with pytest.raises(InvalidReceipt):
        broker.ack(held)  # its tag belongs to a dead channel: never sent
    [again] = _collect(broker, queue, 1)  # RabbitMQ requeued it; consuming resumed
    assert (again.envelope.id, again.redelivered) == (sent.id, True)
    broker.ack(again)
    broker.publish(_env(b"after"), queue=queue)
    [after] = _collect(broker, queue, 1)
    broker.ack(after)
    assert broker.link.generation == generation + 1


def test_a_consume_channel_closed_by_the_server_is_reopened_and_held_deliveries_return(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    # RabbitMQ closes the consume channel (406) when consumer_timeout passes; acking an
    # unknown tag triggers the same 406 on demand.
    queue = _queue(janitor)
    broker = make_amqp_broker()
    sent = _env(b"held")
    broker.publish(sent, queue=queue)
    [held] = _collect(broker, queue, 1)
    link = broker.link
    epoch = link.run(lambda: link.epoch("con"), time.monotonic() + 5)
    link.call_soon(lambda: link.channel("con").basic_ack(999_999))
    eventually(lambda: link.run(lambda: link.epoch("con"), time.monotonic() + 5) > epoch, 10.0)
    with pytest.raises(InvalidReceipt):
        broker.ack(held)
    [again] = _collect(broker, queue, 1)
    assert (again.envelope.id, again.redelivered) == (sent.id, True)
    broker.ack(again)


def test_failover_skips_a_dead_host(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    amqp_url: str,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker(f"{UNREACHABLE_AMQP_URL};{amqp_url}")
    broker.publish(_env(b"x"), queue=queue)
    assert len(_collect(broker, queue, 1)) == 1


def test_wrong_credentials_fail_fast_as_a_configuration_error(janitor: QueueJanitor) -> None:  # noqa: F811
    [endpoint], _ = parse_amqp_url(AMQP_URL)
    url = (
        f"amqp://{endpoint.username}:wrong-{uuid.uuid4().hex[:6]}@{endpoint.host}:{endpoint.port}//"
    )
    broker = janitor.track(AMQPBroker.from_url(url))
    start = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        broker.declare_queue(unique_name("never"))
    assert time.monotonic() - start < 5.0
    assert "wrong-" not in str(info.value)


def test_a_broker_that_never_connected_fails_fast(janitor: QueueJanitor) -> None:  # noqa: F811
    broker = janitor.track(AMQPBroker.from_url(UNREACHABLE_AMQP_URL))
    start = time.monotonic()
    with pytest.raises(ConnectionLost):
        broker.receive(unique_name("never"), timeout=0)
    assert time.monotonic() - start < 3.0


# ================================================================================ dead letters


def test_the_dlx_option_records_the_reason_and_matches_celerys_queue_arguments(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    amqp_url: str,  # noqa: F811
    raw: Any,
) -> None:
    """conveyor's reject records its reason in this mode too (before, RabbitMQ's move kept
    only ``x-death``: the reason was in a log line alone); what RabbitMQ dead-letters itself
    (here a Celery-like client rejecting without requeue) still lands in the dead-letter queue
    natively, through the queue's arguments, with ``x-death``."""
    queue = _queue(janitor)
    broker = make_amqp_broker(dead_letter="dlx")
    sent = _env(b"poison")
    broker.publish(sent, queue=queue)
    [got] = _collect(broker, queue, 1)
    broker.reject(got, requeue=False, reason="ValueError: bad")
    [dead] = _collect(broker, broker.dead_letter_queue(queue), 1)
    assert (dead.envelope.id, dead.envelope.body) == (sent.id, sent.body)
    assert dead.envelope.headers["x-conveyor-dead-letter-reason"] == "ValueError: bad"
    assert dead.envelope.headers["x-conveyor-dead-letter-queue"] == queue
    broker.ack(dead)
    broker.publish(_env(b"native"), queue=queue)
    broker.close()  # its consumer would take the message before the other client can
    method, _props, _body = _raw_get(raw, queue)
    raw.basic_reject(method.delivery_tag, requeue=False)
    broker = make_amqp_broker(dead_letter="dlx")
    [moved] = _collect(broker, broker.dead_letter_queue(queue), 1)
    assert moved.envelope.body == b"native"
    assert moved.envelope.headers["x-death"][0]["reason"] == "rejected"
    broker.ack(moved)
    _kombu_declare(
        amqp_url,
        queue,
        queue_arguments={
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{queue}.dead",
        },
    )


def _raw_get(channel: Any, queue: str) -> tuple[Any, Any, bytes]:
    def got() -> tuple[Any, Any, bytes] | None:
        method, props, body = channel.basic_get(queue)
        return None if method is None else (method, props, body)

    found: tuple[Any, Any, bytes] = eventually(got, 10, message=f"a message on {queue}")
    return found


def test_publish_dead_lettering_records_the_reason_without_queue_arguments(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    amqp_url: str,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker()
    broker.publish(_env(b"poison"), queue=queue)
    [got] = _collect(broker, queue, 1)
    broker.reject(got, requeue=False, reason="ValueError: boom")
    [dead] = _collect(broker, broker.dead_letter_queue(queue), 1)
    assert dead.envelope.headers["x-conveyor-dead-letter-reason"] == "ValueError: boom"
    assert dead.envelope.headers["x-conveyor-dead-letter-queue"] == queue
    broker.ack(dead)
    _kombu_declare(amqp_url, queue)  # still Celery's plain declaration


# ================================================================================ consuming


def test_prefetch_holds_no_more_than_asked_so_other_consumers_get_the_rest(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    queue = _queue(janitor)
    first, second = make_amqp_broker(), make_amqp_broker()
    first.publish_many([_env(str(i).encode()) for i in range(20)], queue=queue)
    held = first.receive(queue, max_messages=5, timeout=5.0)
    assert 1 <= len(held) <= 5
    rest = _collect(second, queue, 15)
    assert len({d.envelope.id for d in held + rest}) == 20


def test_extend_warns_when_a_delivery_nears_the_servers_consumer_timeout(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = _queue(janitor)
    broker = make_amqp_broker(consumer_timeout=2.0)
    broker.publish(_env(), queue=queue)
    [got] = _collect(broker, queue, 1)
    with caplog.at_level(logging.WARNING, logger="conveyor.transports.amqp"):
        broker.extend(got, 5.0)
        broker.extend(got, 5.0)
    assert sum("consumer_timeout" in r.getMessage() for r in caplog.records) == 1
    broker.ack(got)


def test_the_io_thread_keeps_heartbeats_while_the_caller_is_busy(
    make_amqp_broker: Make,  # noqa: F811
    janitor: QueueJanitor,  # noqa: F811
) -> None:
    # With heartbeat=1 RabbitMQ drops a connection silent for ~2 s. Nothing is called for
    # 3 s here (as during a long task): the I/O thread answers heartbeats meanwhile.
    queue = _queue(janitor)
    broker = make_amqp_broker(heartbeat=1.0)
    broker.declare_queue(queue)
    generation = broker.link.generation
    time.sleep(3.0)
    broker.publish(_env(), queue=queue)
    assert broker.link.generation == generation


def test_rabbitmqctl_helper_is_usable() -> None:
    done = rabbitmqctl("status")
    assert isinstance(done, subprocess.CompletedProcess)

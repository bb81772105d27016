"""Publish rate to RabbitMQ: conveyor (confirms always on, batched) next to raw pika.

Every mode publishes the same persistent Celery task message (protocol v2 headers, JSON body)
to one durable queue, and is timed until the last message is accepted:

* ``pika, no confirms``: ``BlockingChannel.basic_publish`` in a loop; "accepted" only means
  written to the socket (a crash or a full disk loses messages silently: the baseline).
* ``pika, confirm each``: ``confirm_delivery()``, so every ``basic_publish`` waits for its
  own confirm: the ~600 msg/s floor this machine is known for.
* ``conveyor publish, 1 thread``: ``AMQPBroker.publish`` waits for its confirm too, but the
  I/O thread keeps reading while waiting.
* ``conveyor publish, N threads``: one broker shared by N threads; concurrent publishes
  share confirm round trips (RabbitMQ acks them with ``multiple``).
* ``conveyor publish_many(B)``: B messages sent, then one wait for all their confirms.

Each mode runs ``--runs`` times (default 3) and the table shows the median rate, min and
max. The queue is purged between runs and deleted at the end. Bounded: ``--messages``
(default 5000) per run, ``--slow-messages`` (default 1500) for the confirm-each mode.

Usage::

    .venv/bin/python bench/amqp_publish.py [--url amqp://guest:guest@127.0.0.1:5672//]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pika

from conveyor.core.celery import TaskMessage, build_envelope
from conveyor.core.types import Envelope
from conveyor.transports.amqp import AMQPBroker, parse_amqp_url

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def task_envelope(n: int) -> Envelope:
    return build_envelope(
        TaskMessage(
            task="bench.add",
            id=str(uuid.uuid4()),
            args=(n, n + 1),
            reply_to="bench-replies",
        )
    )


def pika_channel(url: str) -> tuple[pika.BlockingConnection, object]:
    endpoint = parse_amqp_url(url)[0][0]
    params = pika.ConnectionParameters(
        host=endpoint.host,
        port=endpoint.port,
        virtual_host=endpoint.vhost,
        credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
    )
    connection = pika.BlockingConnection(params)
    return connection, connection.channel()


def run_pika(url: str, queue: str, envelopes: list[Envelope], *, confirms: bool) -> float:
    connection, channel = pika_channel(url)
    try:
        if confirms:
            channel.confirm_delivery()  # type: ignore[attr-defined]
        props = [
            pika.BasicProperties(
                content_type=e.content_type,
                content_encoding=e.content_encoding,
                headers=dict(e.headers),
                delivery_mode=2,
                priority=0,
                correlation_id=e.correlation_id,
                reply_to=e.reply_to,
            )
            for e in envelopes
        ]
        start = time.perf_counter()
        for envelope, prop in zip(envelopes, props, strict=True):
            channel.basic_publish("", queue, envelope.body, prop)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
    finally:
        connection.close()
    return len(envelopes) / elapsed


def run_conveyor_threads(
    broker: AMQPBroker, queue: str, envelopes: list[Envelope], n: int
) -> float:
    chunks = [envelopes[i::n] for i in range(n)]
    errors: list[BaseException] = []

    def publish(chunk: list[Envelope]) -> None:
        try:
            for envelope in chunk:
                broker.publish(envelope, queue=queue)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(c,)) for c in chunks]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(envelopes) / elapsed


def run_conveyor_batches(
    broker: AMQPBroker, queue: str, envelopes: list[Envelope], size: int
) -> float:
    start = time.perf_counter()
    for i in range(0, len(envelopes), size):
        broker.publish_many(envelopes[i : i + size], queue=queue)
    return len(envelopes) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--slow-messages", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)

    queue = f"bench-publish-{uuid.uuid4().hex[:8]}"
    broker = AMQPBroker.from_url(args.url)
    broker.declare_queue(queue)
    fast = [task_envelope(n) for n in range(args.messages)]
    slow = fast[: args.slow_messages]
    modes: list[tuple[str, int, Callable[[], float]]] = [
        (
            "pika, no confirms (no guarantee)",
            len(fast),
            lambda: run_pika(args.url, queue, fast, confirms=False),
        ),
        (
            "pika, confirm each (sync)",
            len(slow),
            lambda: run_pika(args.url, queue, slow, confirms=True),
        ),
        (
            "conveyor publish, 1 thread",
            len(slow),
            lambda: run_conveyor_threads(broker, queue, slow, 1),
        ),
        (
            f"conveyor publish, {args.threads} threads",
            len(fast),
            lambda: run_conveyor_threads(broker, queue, fast, args.threads),
        ),
        (
            "conveyor publish_many(100)",
            len(fast),
            lambda: run_conveyor_batches(broker, queue, fast, 100),
        ),
        (
            "conveyor publish_many(1000)",
            len(fast),
            lambda: run_conveyor_batches(broker, queue, fast, 1000),
        ),
    ]
    rows = []
    try:
        for name, count, run in modes:
            rates = []
            for _ in range(args.runs):
                rates.append(run())
                broker.purge(queue)
            rows.append((name, count, statistics.median(rates), min(rates), max(rates)))
            print(f"  {name}: {statistics.median(rates):,.0f} msg/s", file=sys.stderr)
    finally:
        broker.delete_queue(queue)
        broker.close()

    print(f"\nPublish rate to {queue} (persistent, durable queue), median of {args.runs} runs\n")
    print(f"| {'mode':<36} | {'msgs':>5} | {'median msg/s':>12} | {'min':>7} | {'max':>7} |")
    print(f"|{'-' * 38}|{'-' * 7}|{'-' * 14}|{'-' * 9}|{'-' * 9}|")
    for name, count, median, low, high in rows:
        print(f"| {name:<36} | {count:>5} | {median:>12,.0f} | {low:>7,.0f} | {high:>7,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

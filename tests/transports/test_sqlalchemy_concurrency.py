"""4 producer and 4 consumer PROCESSES move 20,000 messages through the SQL broker.

Issue 3, item 4. Per database (SQLite file in WAL mode, PostgreSQL, MariaDB):

* 4 producer processes publish 5,000 messages each (two one at a time, two in batches of
  100), priorities 0-2 mixed;
* 4 consumer processes receive batches of up to 20 and ack each message;
* consumer 0 deliberately abandons every 500th message it receives for the first time: it
  shortens that delivery's lease to 1 s with ``extend`` and never acks it, so those come back
  to some consumer as ``redelivered``; every other lease is 60 s, so nothing else may come
  back even on a loaded machine;
* the test asserts: every message acked exactly once, none lost, none duplicated apart from
  the abandoned deliveries (counted), every abandoned message redelivered, no unexpected
  redelivery, no consumer error. Counts and timings are printed (``-s``) and attached to the
  test report (``record_property``).

Marked ``slow``: deselect with ``-m "not slow"``. Bounded: fails after 300 s.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.sql import SqlTarget, make_target, selected

from conveyor.core.errors import InvalidReceipt
from conveyor.core.types import Envelope
from conveyor.testing.support import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PRODUCERS = 4
CONSUMERS = 4
PER_PRODUCER = 5_000
TOTAL = PRODUCERS * PER_PRODUCER
ABANDON_EVERY = 500
ABANDONED_LEASE = 1.0
LONG_LEASE = 60.0
DEADLINE = 300.0

KINDS = [k for k in selected() if k in ("sqlite", "postgres", "mysql")]


def _broker(url: str, lease: float) -> Any:
    from conveyor.transports.sqlalchemy import SQLAlchemyBroker

    return SQLAlchemyBroker.from_url(url, lease_seconds=lease)


def produce(url: str, queue: str, index: int, out: str) -> None:
    """Child process: publish PER_PRODUCER messages; write counts to ``out``."""
    broker = _broker(url, LONG_LEASE)
    start = time.monotonic()
    envelopes = [
        Envelope(id=f"p{index}-{i}", body=f"{index}:{i}".encode(), priority=i % 3)
        for i in range(PER_PRODUCER)
    ]
    if index % 2:
        for envelope in envelopes:
            broker.publish(envelope, queue=queue)
    else:
        for first in range(0, PER_PRODUCER, 100):
            broker.publish_many(envelopes[first : first + 100], queue=queue)
    report = {"published": len(envelopes), "seconds": time.monotonic() - start}
    report["retries"] = broker.retries
    broker.close()
    Path(out).write_text(json.dumps(report))


def consume(url: str, queue: str, index: int, out: str, acked: Any, done: Any) -> None:
    """Child process: receive and ack until ``done``; write what happened to ``out``."""
    abandoning = index == 0
    broker = _broker(url, LONG_LEASE)
    report: dict[str, Any] = {
        "acked": [],
        "deliveries": 0,
        "redelivered": [],
        "abandoned": [],
        "invalid_receipts": 0,
        "errors": [],
    }
    first_seen = 0
    try:
        while not done.is_set():
            batch = broker.receive(queue, max_messages=20, timeout=0.5)
            for delivery in batch:
                report["deliveries"] += 1
                message_id = delivery.envelope.id
                if delivery.redelivered:
                    report["redelivered"].append(message_id)
                else:
                    first_seen += 1
                    if abandoning and first_seen % ABANDON_EVERY == 0:
                        # Never acked, lease cut short: it runs out, someone gets it again.
                        broker.extend(delivery, ABANDONED_LEASE)
                        report["abandoned"].append(message_id)
                        continue
                try:
                    broker.ack(delivery)
                except InvalidReceipt:
                    report["invalid_receipts"] += 1
                    continue
                report["acked"].append(message_id)
                with acked.get_lock():
                    acked.value += 1
    except Exception as exc:  # reported to the parent, which fails the test
        report["errors"].append(f"{type(exc).__name__}: {exc}")
    report["retries"] = broker.retries
    broker.close()
    Path(out).write_text(json.dumps(report))


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    return make_target(request.param, tmp_path)


def test_four_producers_and_four_consumers_move_20000_messages_exactly_once(
    target: SqlTarget, tmp_path: Path, record_property: Any
) -> None:
    url = f"sqla+{target.url}"
    queue = unique_name("concurrency")
    setup = _broker(url, LONG_LEASE)
    setup.create_tables()  # not part of the race being measured
    ctx = multiprocessing.get_context("spawn")
    acked = ctx.Value("q", 0)
    done = ctx.Event()
    producers = [
        ctx.Process(target=produce, args=(url, queue, i, str(tmp_path / f"p{i}.json")))
        for i in range(PRODUCERS)
    ]
    consumers = [
        ctx.Process(target=consume, args=(url, queue, i, str(tmp_path / f"c{i}.json"), acked, done))
        for i in range(CONSUMERS)
    ]
    start = time.monotonic()
    try:
        for process in consumers + producers:
            process.start()
        while acked.value < TOTAL and time.monotonic() - start < DEADLINE:
            crashed = [p.name for p in producers + consumers if p.exitcode not in (None, 0)]
            if crashed or not any(p.is_alive() for p in consumers):
                break
            time.sleep(0.2)
        drained = time.monotonic() - start
        done.set()
        for process in producers + consumers:
            process.join(timeout=60)
    finally:
        done.set()
        for process in producers + consumers:
            if process.is_alive():
                process.kill()
                process.join(5)
    leftover = setup.receive(queue, max_messages=100, timeout=0.5)
    setup.purge(queue)
    setup.close()

    missing = [
        name
        for name in [f"p{i}" for i in range(PRODUCERS)] + [f"c{i}" for i in range(CONSUMERS)]
        if not (tmp_path / f"{name}.json").exists()
    ]
    assert not missing, f"processes {missing} died without a report (see their stderr above)"
    produced = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(PRODUCERS)]
    reports = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(CONSUMERS)]
    acks = Counter(m for r in reports for m in r["acked"])
    abandoned = [m for r in reports for m in r["abandoned"]]
    redelivered = Counter(m for r in reports for m in r["redelivered"])
    expected = {f"p{p}-{i}" for p in range(PRODUCERS) for i in range(PER_PRODUCER)}
    summary = {
        "database": target.kind,
        "messages": TOTAL,
        "published": sum(p["published"] for p in produced),
        "acked": sum(acks.values()),
        "distinct_acked": len(acks),
        "deliveries": sum(r["deliveries"] for r in reports),
        "abandoned": len(abandoned),
        "redelivered": sum(redelivered.values()),
        "invalid_receipts": sum(r["invalid_receipts"] for r in reports),
        "retries_producers": sum(p["retries"] for p in produced),
        "retries_consumers": sum(r["retries"] for r in reports),
        "acked_per_consumer": [len(r["acked"]) for r in reports],
        "publish_seconds_max": round(max(p["seconds"] for p in produced), 2),
        "drain_seconds": round(drained, 2),
        "messages_per_second": round(TOTAL / drained, 1),
    }
    print(f"\nSQL concurrency {target.kind} (pid {os.getpid()}): {json.dumps(summary)}")
    for key, value in summary.items():
        record_property(key, value)

    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors
    assert drained < DEADLINE, f"not drained within {DEADLINE} s: {summary}"
    assert summary["published"] == TOTAL
    assert not leftover, f"{len(leftover)} messages left in the queue"
    assert set(acks) == expected, f"lost: {len(expected - set(acks))}"
    duplicated = [m for m, n in acks.items() if n > 1]
    assert not duplicated, f"{len(duplicated)} acked more than once, e.g. {duplicated[:3]}"
    assert abandoned, "consumer 0 abandoned nothing: the redelivery path was not exercised"
    assert set(redelivered) == set(abandoned), (
        f"unexpected redeliveries: {sorted(set(redelivered) - set(abandoned))[:5]}, "
        f"abandoned but not redelivered: {sorted(set(abandoned) - set(redelivered))[:5]}"
    )
    assert summary["deliveries"] == TOTAL + len(abandoned)
    assert summary["invalid_receipts"] == 0

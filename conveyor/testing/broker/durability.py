"""Broker suite, durability: processes SIGKILLed right after publishing or while holding a
message (other processes, see :mod:`conveyor.testing.processes`), and many producers and
consumers at once.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from time import monotonic
from typing import Any

from conveyor.testing.broker.base import (
    AT_LEAST_ONCE,
    CROSS_PROCESS,
    DURABLE,
    BrokerFactory,
    BrokerSuite,
    SpawnBroker,
    _collect,
    _env,
)
from conveyor.testing.processes import envelope_from_json, envelope_to_json
from conveyor.testing.support import eventually, requires


class DurabilityChecks(BrokerSuite):
    """Nothing is lost and nothing duplicated, whoever dies and however many run at once."""

    @requires(DURABLE)
    def test_messages_published_by_a_process_sigkilled_right_after_publish_are_delivered(
        self, new_broker: BrokerFactory, queue: str, spawn_broker: SpawnBroker
    ) -> None:
        # The publishing process SIGKILLs itself the instant publish() and publish_many()
        # returned (a power cut, the OOM killer): a broker that buffers publishes, or
        # confirms them later or in close(), loses them here. Another process gets them all.
        one = _env(b"published, then killed", headers={"task": "tasks.durable"})
        batch = [_env(bytes([i]) * 3) for i in range(3)]
        publisher = spawn_broker()
        publisher.request(
            "publish",
            queue=queue,
            envelopes=[envelope_to_json(one)],
            many=[envelope_to_json(e) for e in batch],
            then_sigkill=True,
        )
        code = publisher.wait_exit()
        assert code == -signal.SIGKILL, f"the publisher exited with {code}, not by SIGKILL"
        consumer = new_broker()
        got = _collect(consumer, queue, 4, timeout=10 + self.timing_slack, ack=True)
        received = {d.envelope.id: d.envelope for d in got}
        assert sorted(received) == sorted(e.id for e in [one, *batch])
        for envelope in [one, *batch]:
            assert received[envelope.id] == envelope
        self._assert_empty(consumer, queue, timeout=0.2)

    @requires(CROSS_PROCESS, AT_LEAST_ONCE)
    def test_a_message_held_by_a_sigkilled_consumer_process_is_redelivered_to_another(
        self, broker: Any, new_broker: BrokerFactory, queue: str, spawn_broker: SpawnBroker
    ) -> None:
        # The consumer is another process, with the suite's short lease; it receives the
        # message, does not ack it, and is SIGKILLed: no close(), no goodbye. The message
        # comes back, to this process, marked redelivered (a server that sees the
        # connection drop may bring it back at once; a lease-based broker when the lease
        # runs out).
        holder = spawn_broker(lease_seconds=self.short_lease)
        sent = _env(b"held by a process that dies", headers={"task": "tasks.crash"})
        broker.publish(sent, queue=queue)
        answer = holder.request("receive", queue=queue, count=1, timeout=10 + self.timing_slack)
        held = answer["deliveries"]
        assert [d["envelope"]["id"] for d in held] == [sent.id], "the other process got nothing"
        assert envelope_from_json(held[0]["envelope"]) == sent
        assert held[0]["redelivered"] is False
        watcher = new_broker()
        if monotonic() - answer["at"] < self.short_lease / 2:
            # Held by a live process under a running lease: invisible here.
            self._assert_empty(watcher, queue)
        code = holder.kill()
        assert code == -signal.SIGKILL, f"the holder exited with {code}, not by SIGKILL"
        killed = monotonic()
        [again] = eventually(
            lambda: watcher.receive(queue, timeout=0.25),
            10 + self.short_lease,
            message=f"redelivery of a message held by a process SIGKILLed "
            f"(lease {self.short_lease} s)",
        )
        assert (again.envelope.id, again.envelope.body) == (sent.id, sent.body)
        assert again.redelivered is True, f"redelivered after {monotonic() - killed:.2f} s"
        assert again.delivery_count in (None, 2)
        watcher.ack(again)
        self._assert_empty(watcher, queue, timeout=0.2)

    def test_many_producers_and_consumers_lose_nothing_and_duplicate_nothing(
        self, new_broker: BrokerFactory, queue: str
    ) -> None:
        producers = consumers = 4
        per_producer = max(1, self.concurrency_messages // producers)
        total = producers * per_producer
        expected = [
            [_env(f"{p}:{i}".encode()) for i in range(per_producer)] for p in range(producers)
        ]
        # Every producer and consumer is its own broker, as separate worker processes are.
        producer_brokers = [new_broker() for _ in range(producers)]
        consumer_brokers = [new_broker() for _ in range(consumers)]
        seen: Counter[str] = Counter()
        received = [0]
        seen_lock = threading.Lock()
        done = threading.Event()
        errors: list[BaseException] = []
        deadline = monotonic() + self.concurrency_timeout

        def produce(index: int) -> None:
            try:
                envelopes = expected[index]
                if index % 2:  # half publish one by one, half in batches
                    for envelope in envelopes:
                        producer_brokers[index].publish(envelope, queue=queue)
                else:
                    for start in range(0, per_producer, 25):
                        chunk = envelopes[start : start + 25]
                        producer_brokers[index].publish_many(chunk, queue=queue)
            except BaseException as exc:
                errors.append(exc)
                done.set()

        def consume(index: int) -> None:
            consumer = consumer_brokers[index]
            try:
                while not done.is_set() and monotonic() < deadline:
                    batch = consumer.receive(queue, max_messages=20, timeout=0.2)
                    for delivery in batch:
                        consumer.ack(delivery)
                    with seen_lock:
                        seen.update(d.envelope.id for d in batch)
                        received[0] += len(batch)
                        if received[0] >= total:
                            done.set()
            except BaseException as exc:
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
        threads += [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - monotonic()) + 10)
        assert not any(t.is_alive() for t in threads), "producers or consumers hung"
        assert not errors, errors
        duplicates = [i for i, n in seen.items() if n > 1]
        assert not duplicates, f"{len(duplicates)} duplicated, e.g. {duplicates[:3]}"
        assert done.is_set(), (
            f"consumers received {len(seen)} of {total} within {self.concurrency_timeout}s "
            "(slow server? lower concurrency_messages or raise concurrency_timeout)"
        )
        missing = {e.id for batch in expected for e in batch} - set(seen)
        assert not missing, f"{len(missing)} of {total} lost"
        self._assert_empty(consumer_brokers[0], queue, timeout=0.2)

"""Memory-broker behaviour beyond the shared conformance suite: URL and options, store
sharing, dead-letter headers, waking, outage simulation and internal bookkeeping."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import broker_from_url
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    InvalidReceipt,
    InvalidURL,
)
from conveyor.core.types import Envelope
from conveyor.transports.memory import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    MemoryBroker,
    MemoryBrokerOptions,
    MemoryStore,
)


def env(body: bytes = b"{}", **fields: object) -> Envelope:
    return Envelope(id=uuid.uuid4().hex, body=body, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- URL and options
def test_memory_url_builds_a_memory_broker_through_the_registry() -> None:
    broker = broker_from_url("memory://")
    assert isinstance(broker, MemoryBroker)
    assert broker.options == MemoryBrokerOptions()
    broker.close()


def test_keyword_options_beat_url_query_which_beats_defaults() -> None:
    assert MemoryBroker.from_url("memory://").options.lease_seconds == 60.0
    assert MemoryBroker.from_url("memory://?lease_seconds=5").options.lease_seconds == 5.0
    assert MemoryBroker.from_url("memory://?lease_seconds=250ms").options.lease_seconds == 0.25
    broker = MemoryBroker.from_url("memory://?lease_seconds=5", lease_seconds=7)
    assert broker.options.lease_seconds == 7.0


def test_unknown_option_fails_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match="Did you mean 'lease_seconds'"):
        MemoryBroker.from_url("memory://?lease_second=5")
    with pytest.raises(ConfigurationError, match="lease_secs"):
        MemoryBroker.from_url("memory://", lease_secs=5)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf"])
def test_bad_lease_seconds_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigurationError):
        MemoryBroker.from_url(f"memory://?lease_seconds={value}")


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(InvalidURL):
        MemoryBroker.from_url("redis://localhost:6379/0")


def test_repr_masks_the_password() -> None:
    broker = MemoryBroker.from_url("memory://user:hunter2@localhost/")
    assert "hunter2" not in repr(broker)
    assert "***" in repr(broker)


# ---------------------------------------------------------------- stores
def test_every_url_built_broker_has_a_private_store() -> None:
    first, second = MemoryBroker.from_url("memory://"), MemoryBroker.from_url("memory://")
    first.publish(env(), queue="q")
    assert second.receive("q", timeout=0) == []
    assert first.store is not second.store


def test_brokers_on_one_store_share_queues() -> None:
    store = MemoryStore()
    producer = store.broker()
    via_url = MemoryBroker.from_url("memory://", store=store)
    sibling = producer.sibling(lease_seconds=3)
    assert sibling.options.lease_seconds == 3.0
    assert sibling.store is store
    for consumer in (producer, via_url, sibling):
        sent = env()
        producer.publish(sent, queue="shared")
        [got] = consumer.receive("shared", timeout=0)
        assert got.envelope.id == sent.id


def test_closing_the_store_simulates_an_outage() -> None:
    store = MemoryStore()
    broker = store.broker()
    store.close()
    assert store.closed
    for call in (
        lambda: broker.publish(env(), queue="q"),
        lambda: broker.receive("q", timeout=0),
        lambda: broker.purge("q"),
        lambda: broker.size("q"),
        lambda: broker.declare_queue("q"),
    ):
        with pytest.raises(ConnectionLost, match="store"):
            call()
    broker.close()  # closing a broker on a dead store still works


@pytest.mark.parametrize("closer", ["broker", "store"])
def test_closing_wakes_a_receive_blocked_in_another_thread(closer: str) -> None:
    store = MemoryStore()
    broker = store.broker()
    outcome: list[BaseException] = []
    started = threading.Event()

    def wait() -> None:
        started.set()
        try:
            broker.receive("q", timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    started.wait(5)
    time.sleep(0.05)  # let receive reach its wait; the assertion below does not depend on it
    (broker if closer == "broker" else store).close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionLost)


# ---------------------------------------------------------------- semantics
def test_dead_letter_keeps_reason_and_source_queue_in_headers() -> None:
    broker = MemoryBroker()
    sent = env(headers={"task": "t"})
    broker.publish(sent, queue="work")
    [got] = broker.receive("work", timeout=0)
    broker.reject(got, reason="ValueError: boom")
    assert broker.dead_letter_queue("work") == "work.dead"
    [dead] = broker.receive("work.dead", timeout=0)
    assert dead.envelope.id == sent.id
    assert dead.envelope.headers == {
        "task": "t",
        DEAD_LETTER_REASON_HEADER: "ValueError: boom",
        DEAD_LETTER_SOURCE_HEADER: "work",
    }
    assert dead.redelivered is False
    assert sent.headers == {"task": "t"}  # the original envelope is not mutated


def test_dead_letter_queue_of_a_maximal_name_still_works() -> None:
    broker = MemoryBroker()
    name = "x" * 200
    broker.publish(env(), queue=name)
    [got] = broker.receive(name, timeout=0)
    broker.reject(got)
    assert len(broker.receive(broker.dead_letter_queue(name), timeout=0)) == 1


def test_late_ack_before_anyone_else_took_the_message_succeeds() -> None:
    broker = MemoryBroker(options=MemoryBrokerOptions(lease_seconds=0.05))
    broker.publish(env(), queue="q")
    [got] = broker.receive("q", timeout=0)
    time.sleep(0.1)  # the lease is over, but no consumer has looked at the queue since
    broker.ack(got)
    assert broker.receive("q", timeout=0) == []


def test_size_takes_back_expired_leases_so_the_late_ack_then_fails() -> None:
    broker = MemoryBroker(options=MemoryBrokerOptions(lease_seconds=0.05))
    broker.publish(env(), queue="q")
    [got] = broker.receive("q", timeout=0)
    time.sleep(0.1)
    assert broker.size("q") == 1
    with pytest.raises(InvalidReceipt):
        broker.ack(got)
    with pytest.raises(InvalidReceipt):
        broker.reject(got)


def test_blocked_receive_wakes_when_a_lease_expires() -> None:
    store = MemoryStore()
    holder, waiter = store.broker(lease_seconds=0.3), store.broker()
    holder.publish(env(), queue="q")
    holder.receive("q", timeout=0)
    start = time.monotonic()
    [again] = waiter.receive("q", timeout=10)
    assert again.redelivered
    assert 0.25 <= time.monotonic() - start < 2.0


def test_redelivered_messages_go_to_the_front_of_their_priority() -> None:
    broker = MemoryBroker()
    first, second, third = env(b"1"), env(b"2"), env(b"3")
    broker.publish_many([first, second, third], queue="q")
    assert len(broker.receive("q", max_messages=2, timeout=0)) == 2
    broker.close()
    other = broker.sibling()
    got = other.receive("q", max_messages=3, timeout=0)
    assert [d.envelope.id for d in got] == [first.id, second.id, third.id]
    assert [d.redelivered for d in got] == [True, True, False]


def test_several_queues_prefer_higher_priority_then_queue_order() -> None:
    broker = MemoryBroker()
    low_a, low_b, high_b = env(b"la"), env(b"lb"), env(b"hb", priority=3)
    broker.publish(low_a, queue="a")
    broker.publish(low_b, queue="b")
    broker.publish(high_b, queue="b")
    got = broker.receive(["a", "b"], max_messages=3, timeout=0)
    assert [d.envelope.id for d in got] == [high_b.id, low_a.id, low_b.id]


def test_publish_many_is_all_or_nothing() -> None:
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError):
        broker.publish_many([env(), env(priority=12)], queue="q")
    assert broker.size("q") == 0


def test_a_delivery_from_another_store_is_an_invalid_receipt() -> None:
    one, two = MemoryBroker(), MemoryBroker()
    one.publish(env(), queue="q")
    [got] = one.receive("q", timeout=0)
    with pytest.raises(InvalidReceipt):
        two.ack(got)


def test_ack_through_another_broker_of_the_same_store_settles_the_delivery() -> None:
    store = MemoryStore()
    consumer, other = store.broker(), store.broker()
    consumer.publish(env(), queue="q")
    [got] = consumer.receive("q", timeout=0)
    other.ack(got)
    consumer.close()  # nothing left to release
    assert other.receive("q", timeout=0) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_messages": 0}, "max_messages"),
        ({"timeout": -1.0}, "timeout"),
    ],
)
def test_bad_receive_arguments_are_configuration_errors(
    kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        MemoryBroker().receive("q", **kwargs)  # type: ignore[arg-type]


def test_extend_refuses_negative_seconds() -> None:
    broker = MemoryBroker()
    broker.publish(env(), queue="q")
    [got] = broker.receive("q", timeout=0)
    with pytest.raises(ConfigurationError):
        broker.extend(got, -1.0)


def test_settled_deliveries_do_not_pile_up_in_the_lease_heap() -> None:
    broker = MemoryBroker()
    for _ in range(2000):
        broker.publish(env(), queue="q")
        for delivery in broker.receive("q", timeout=0):
            broker.ack(delivery)
    queue = broker.store._queues["q"]
    assert len(queue.leases) <= 2 * len(queue.held) + 65


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9), max_size=60))
def test_delivery_order_is_a_stable_sort_by_descending_priority(priorities: list[int]) -> None:
    broker = MemoryBroker()
    sent = [env(priority=p) for p in priorities]
    broker.publish_many(sent, queue="q")
    got = broker.receive("q", max_messages=max(len(sent), 1), timeout=0)
    expected = sorted(sent, key=lambda e: -e.priority)  # sorted() is stable: FIFO per level
    assert [d.envelope.id for d in got] == [e.id for e in expected]

"""``BrokerConformance``: the broker contract of :mod:`conveyor.core.protocols`, as tests.

Adopt it by subclassing in a module pytest collects, with one fixture::

    import pytest
    from conveyor.testing.broker import BrokerConformance

    class TestMyBroker(BrokerConformance):
        @pytest.fixture
        def make_broker(self):
            client = connect_or_skip()                  # e.g. service_unavailable(...) on error
            yield lambda **options: MyBroker(client, **options)
            client.close()

Fixture contract:

* ``make_broker`` (required) returns a callable ``make_broker(**options) -> Broker``. Every call
  builds a NEW open broker connected to the SAME queues (a second consumer, as a second worker
  process would be). ``options`` are passed through; the suite uses ``lease_seconds=<float>``
  on brokers that declare ``at_least_once``. The suite closes every broker it makes and purges
  every queue it used (and its dead-letter queue) with a fresh broker after each test.
* ``broker`` is ``make_broker()``. A subclass may override ``broker`` alone instead (yield an
  open broker, close it after); tests that need a second consumer or options then skip with
  the reason "no make_broker fixture ...".
* ``unreachable_broker_url`` (optional): a URL of the implementation's scheme pointing at a
  closed port. The error-translation test builds ``type(broker).from_url(url)`` and expects
  :class:`~conveyor.core.errors.OperationalError` within ``unreachable_timeout`` seconds.
  Without it that test skips ("no unreachable URL given"). Override ``unreachable_broker``
  (a callable that builds the broker) instead when a URL is not enough.

* ``broker_process_recipe`` (optional): how ANOTHER process builds a broker on the same
  queues, a :class:`~conveyor.testing.processes.ProcessRecipe` (an import path, a URL and
  JSON options). The ``durable`` and ``cross_process`` tests start a fresh Python process
  (:mod:`subprocess`, never ``fork``), build the broker there with
  ``factory(url, **options, lease_seconds=...)`` and SIGKILL it. The default,
  ``ProcessRecipe.of(broker)``, is ``type(broker).from_url(broker.url)``: enough for a
  broker built from its URL alone. Override it when ``make_broker`` adds keyword options
  (``ProcessRecipe("acme.broker:AcmeBroker.from_url", URL, {"region": "eu"})``). Without
  one those tests skip ("no broker_process_recipe ..."). They need SIGKILL (POSIX).

Fixtures must be defined in the class (or a base class), not in a ``conftest.py``: the
suite's own defaults would shadow a conftest fixture of the same name.

Dead letters (``dead_letter``): the message received from ``dead_letter_queue(queue)`` keeps
the id, body and headers it had, and carries two more headers: ``x-conveyor-dead-letter-reason``
(:data:`DEAD_LETTER_REASON_HEADER`, the ``reason`` given to ``reject``: exactly, or with
tabs and line breaks as single spaces, since headers and text columns may not carry them) and
``x-conveyor-dead-letter-queue`` (:data:`DEAD_LETTER_QUEUE_HEADER`, the queue it was
rejected from). That is how a worker, an operator or ``conveyor`` itself reads back why a
message died, through the Broker protocol alone.

Class attributes to tune for slow servers: ``short_lease`` (seconds used by lease tests),
``timing_slack`` (seconds of tolerance on time bounds), ``unreachable_timeout``,
``process_timeout`` (bound on each step of another process: start-up, a command, exit),
``concurrency_messages`` / ``concurrency_timeout`` (size and time limit of the
many-producers-and-consumers test), ``detects_lost_leases`` (False where ``ack``/``extend``
cannot tell a lease was lost; the tests then only check nothing was lost).

Tests marked ``@requires(capability)`` skip with "needs capability '<name>'" when the broker
class does not declare it. Every feature capability also has a test that never skips: it checks
the feature works when declared and raises ``UnsupportedFeature`` when not.

Each test uses its own queues (:func:`~conveyor.testing.support.unique_name`), so the suite runs
under pytest-xdist against one server. Waiting is always bounded (``receive`` timeouts or
:func:`~conveyor.testing.support.eventually`), never sleep-and-hope.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from time import monotonic
from typing import Any, ClassVar

import pytest

from conveyor.core.capabilities import BROKER_CAPABILITIES, Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    InvalidReceipt,
    OperationalError,
    UnsupportedFeature,
)
from conveyor.core.protocols import Broker, DeadLetters, LeaseExtension, QueueSize
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import parse_url
from conveyor.testing.processes import (
    ChildProcess,
    ProcessRecipe,
    envelope_from_json,
    envelope_to_json,
    require_sigkill,
)
from conveyor.testing.support import (
    REQUIRES_ATTR,
    eventually,
    missing_capabilities,
    requires,
    unique_name,
)

__all__ = [
    "DEAD_LETTER_QUEUE_HEADER",
    "DEAD_LETTER_REASON_HEADER",
    "BrokerConformance",
    "BrokerFactory",
    "SpawnBroker",
]

#: ``make_broker(**options) -> Broker``. Brokers are typed ``Any`` in the suite because it
#: calls optional-capability methods (``extend``, ``size``) that ``Broker`` does not declare.
BrokerFactory = Callable[..., Any]

#: ``spawn_broker(**options) -> ChildProcess``: a broker built in another process.
SpawnBroker = Callable[..., ChildProcess]

#: Header of a dead letter: the ``reason`` given to ``reject(..., requeue=False)``.
DEAD_LETTER_REASON_HEADER = "x-conveyor-dead-letter-reason"
#: Header of a dead letter: the queue it was rejected from.
DEAD_LETTER_QUEUE_HEADER = "x-conveyor-dead-letter-queue"

_NO_RECIPE = (
    "no broker_process_recipe fixture, and type(broker).from_url(broker.url) cannot be built "
    "in another process (no url, no from_url, or a class defined in a function): override "
    "broker_process_recipe to run the tests that SIGKILL a process"
)
_NO_FACTORY = (
    "no make_broker fixture: this subclass overrides only `broker`, so tests that need a "
    "second consumer on the same queues (or broker options) cannot run"
)
AT_LEAST_ONCE = Capability.AT_LEAST_ONCE
DELAYED = Capability.DELAYED_DELIVERY
PRIORITY = Capability.PRIORITY
DEAD_LETTER = Capability.DEAD_LETTER
LEASE_EXTENSION = Capability.LEASE_EXTENSION
QUEUE_SIZE = Capability.QUEUE_SIZE
DURABLE = Capability.DURABLE
CROSS_PROCESS = Capability.CROSS_PROCESS


def _env(body: bytes = b"{}", **fields: Any) -> Envelope:
    """An envelope with a fresh unique id."""
    return Envelope(id=fields.pop("id", uuid.uuid4().hex), body=body, **fields)


def _ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [d.envelope.id for d in deliveries]


def _collect(
    broker: Any,
    queues: str | Sequence[str],
    count: int,
    *,
    timeout: float = 10.0,
    ack: bool = False,
) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived; fail after ``timeout`` seconds."""
    got: list[Delivery] = []
    deadline = monotonic() + timeout
    while len(got) < count:
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise AssertionError(f"received {len(got)} of {count} messages within {timeout}s")
        batch = broker.receive(
            queues, max_messages=min(count - len(got), 100), timeout=min(remaining, 0.5)
        )
        got.extend(batch)
        if ack:
            for delivery in batch:
                broker.ack(delivery)
    return got


class _Harness:
    """Tracks what one test built so it can be closed and cleaned up afterwards."""

    def __init__(self, factory: BrokerFactory | None, skip_reason: str) -> None:
        self.factory = factory
        self.skip_reason = skip_reason
        self.brokers: list[Any] = []
        self.queues: list[str] = []

    def new(self, **options: Any) -> Any:
        if self.factory is None:
            pytest.skip(self.skip_reason)
        broker = self.factory(**options)
        self.brokers.append(broker)
        return broker

    def cleanup(self) -> None:
        # Close first: closing releases held messages, which the purge below then removes.
        for broker in reversed(self.brokers):
            broker.close()
        if self.factory is None or not self.queues:
            return
        cleaner = self.factory()
        try:
            dead = DEAD_LETTER in cleaner.capabilities
            for name in self.queues:
                cleaner.purge(name)
                if dead:
                    cleaner.purge(cleaner.dead_letter_queue(name))
        finally:
            cleaner.close()


class BrokerConformance:
    """The broker conformance suite. Subclass it as ``Test<Something>``; see the module doc.

    Fixtures a subclass provides: ``make_broker`` (required), ``unreachable_broker_url`` and
    ``broker_process_recipe`` (optional). The last one tells the ``durable`` and
    ``cross_process`` tests how a fresh Python process builds a broker on the same queues
    (``ProcessRecipe("acme.broker:AcmeBroker.from_url", url, {"option": 1})``); by default
    ``type(broker).from_url(broker.url)``, so a broker built from its URL alone needs none.

    The name does not start with ``Test``, so pytest never collects this base class itself.
    """

    #: Lease (seconds) for tests that wait for a lease to expire. Keep it short.
    short_lease: ClassVar[float] = 1.0
    #: Tolerance (seconds) on every upper time bound.
    timing_slack: ClassVar[float] = 1.0
    #: Upper bound (seconds) for an unreachable server to surface as OperationalError.
    unreachable_timeout: ClassVar[float] = 15.0
    #: Whether ``ack``/``extend`` raise InvalidReceipt once the lease was lost.
    detects_lost_leases: ClassVar[bool] = True
    #: Messages moved by the many-producers-and-consumers test (4 producers, 4 consumers),
    #: and the seconds it may take. Lower the count for slow test servers.
    concurrency_messages: ClassVar[int] = 2000
    concurrency_timeout: ClassVar[float] = 60.0
    #: Upper bound (seconds) on each step of a broker in another process: its start-up
    #: (a fresh interpreter importing the driver), each command, its exit.
    process_timeout: ClassVar[float] = 60.0

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture
    def make_broker(self) -> BrokerFactory:
        """Override: return ``make_broker(**options) -> Broker`` (see the module doc)."""
        pytest.skip(_NO_FACTORY)

    @pytest.fixture
    def conveyor_harness(self, request: pytest.FixtureRequest) -> Iterator[_Harness]:
        try:
            factory: BrokerFactory | None = request.getfixturevalue("make_broker")
            reason = ""
        except pytest.skip.Exception as exc:
            # A subclass that overrides only `broker`, or whose server is missing: keep the
            # reason so tests needing the factory skip saying why.
            factory, reason = None, str(exc.msg)
        harness = _Harness(factory, reason)
        yield harness
        harness.cleanup()

    @pytest.fixture
    def new_broker(self, conveyor_harness: _Harness) -> BrokerFactory:
        """``new_broker(**options)``: another consumer on the same queues, closed after."""
        return conveyor_harness.new

    @pytest.fixture
    def broker(self, conveyor_harness: _Harness) -> Any:
        """An open broker (``make_broker()``), closed after the test."""
        return conveyor_harness.new()

    @pytest.fixture
    def make_queue(self, broker: Any, conveyor_harness: _Harness) -> Iterator[Callable[[], str]]:
        """``make_queue()``: a new unique, declared queue, purged after the test."""
        names: list[str] = []

        def make() -> str:
            name = unique_name("conformance")
            broker.declare_queue(name)
            names.append(name)
            conveyor_harness.queues.append(name)
            return name

        yield make
        if conveyor_harness.factory is None:
            # Only `broker` exists: purge with it while it is open (best effort).
            for name in names:
                with contextlib.suppress(ConveyorError):
                    broker.purge(name)

    @pytest.fixture
    def queue(self, make_queue: Callable[[], str]) -> str:
        return make_queue()

    @pytest.fixture
    def unreachable_broker_url(self) -> str:
        """Override: a URL of this scheme whose server does not answer (closed port)."""
        pytest.skip("no unreachable URL given (override the unreachable_broker_url fixture)")

    @pytest.fixture
    def unreachable_broker(self, request: pytest.FixtureRequest, broker: Any) -> Callable[[], Any]:
        """A callable building a broker whose server is gone; by default from
        ``unreachable_broker_url``."""
        url: str = request.getfixturevalue("unreachable_broker_url")
        cls = type(broker)
        return lambda: cls.from_url(url)

    @pytest.fixture
    def broker_process_recipe(self, broker: Any) -> ProcessRecipe:
        """Override: how another process builds a broker on the same queues (module doc)."""
        recipe = ProcessRecipe.of(broker)
        if recipe is None:
            pytest.skip(_NO_RECIPE)
        return recipe

    @pytest.fixture
    def spawn_broker(self, broker_process_recipe: ProcessRecipe) -> Iterator[SpawnBroker]:
        """``spawn_broker(**options)``: a broker in a new process, killed after the test."""
        require_sigkill()
        children: list[ChildProcess] = []

        def spawn(**options: Any) -> ChildProcess:
            child = ChildProcess(
                broker_process_recipe,
                options=options,
                timeout=self.process_timeout,
                what="broker",
            )
            children.append(child)
            return child

        yield spawn
        for child in children:
            child.close()

    @pytest.fixture(autouse=True)
    def _conveyor_capability_gate(self, request: pytest.FixtureRequest) -> None:
        """Skip ``@requires(...)`` tests whose capabilities the broker does not declare."""
        if not getattr(request.function, REQUIRES_ATTR, ()):
            return
        broker = request.getfixturevalue("broker")
        missing = missing_capabilities(request.function, frozenset(broker.capabilities))
        if missing:
            pytest.skip("needs capability " + ", ".join(f"'{c}'" for c in missing))

    # ------------------------------------------------------------------ helpers
    def _lease_broker(self, new_broker: BrokerFactory, broker: Any) -> Any:
        """A consumer with the short lease where the broker has leases (``at_least_once``)."""
        if AT_LEAST_ONCE in broker.capabilities:
            return new_broker(lease_seconds=self.short_lease)
        return new_broker()

    @staticmethod
    def _assert_empty(broker: Any, queue: str, timeout: float = 0.0) -> None:
        leftover = broker.receive(queue, max_messages=10, timeout=timeout)
        assert leftover == [], f"unexpected deliveries: {_ids(leftover)}"

    # ================================================================== shape and capabilities
    def test_broker_satisfies_the_broker_protocol(self, broker: Any) -> None:
        assert isinstance(broker, Broker)
        caps = broker.capabilities
        assert isinstance(broker, LeaseExtension) or LEASE_EXTENSION not in caps
        assert isinstance(broker, QueueSize) or QUEUE_SIZE not in caps
        assert isinstance(broker, DeadLetters) or DEAD_LETTER not in caps

    def test_declared_capabilities_are_known_broker_capabilities(self, broker: Any) -> None:
        caps = type(broker).capabilities
        assert isinstance(caps, frozenset)
        assert all(isinstance(c, Capability) for c in caps), caps
        assert caps <= BROKER_CAPABILITIES, caps - BROKER_CAPABILITIES

    # ================================================================== envelope round trip
    def test_envelope_round_trip_preserves_every_field(self, broker: Any, queue: str) -> None:
        sent = _env(
            b'{"args": [1, 2], "kwargs": {}}',
            content_type="application/x-conveyor-test",
            content_encoding="binary",
            headers={"task": "tasks.add", "retries": 3, "eta": None, "ok": True, "f": 0.5},
            correlation_id="corr-" + uuid.uuid4().hex,
            reply_to="replies-" + uuid.uuid4().hex,
        )
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope == sent
        assert got.queue == queue
        assert got.redelivered is False
        assert got.delivery_count in (None, 1)
        broker.ack(got)

    def test_binary_body_with_all_256_byte_values_round_trips(
        self, broker: Any, queue: str
    ) -> None:
        body = bytes(range(256)) + bytes(reversed(range(256)))
        sent = _env(body, content_type="application/octet-stream", content_encoding="binary")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == body
        assert got.envelope.id == sent.id

    def test_empty_body_round_trips(self, broker: Any, queue: str) -> None:
        sent = _env(b"")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == b""
        assert got.envelope == sent

    def test_one_mebibyte_body_round_trips(self, broker: Any, queue: str) -> None:
        body = random.Random(1234).randbytes(1 << 20)
        sent = _env(body, content_type="application/octet-stream", content_encoding="binary")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == body

    def test_unicode_and_nested_headers_round_trip(self, broker: Any, queue: str) -> None:
        headers = {
            "ünïcødé": "値 ✓ 🚀 — ¿qué?",
            "nested": {"list": [1, "two", {"three": [3.5, None, False]}], "empty": {}},
            "emoji-🔑": ["a", [], {"ß": "ẞ"}],
            "big": 2**53,
            "negative": -7,
        }
        sent = _env(headers=headers)
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert dict(got.envelope.headers) == headers

    @requires(PRIORITY)
    def test_priority_is_preserved_on_the_envelope(self, broker: Any, queue: str) -> None:
        sent = _env(priority=7)
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.priority == 7
        assert got.envelope == sent

    # ================================================================== receive
    def test_empty_receive_returns_an_empty_list_after_its_timeout(
        self, broker: Any, queue: str
    ) -> None:
        timeout = 0.5
        start = monotonic()
        assert broker.receive(queue, max_messages=5, timeout=timeout) == []
        elapsed = monotonic() - start
        assert timeout * 0.9 <= elapsed <= timeout + self.timing_slack, elapsed

    def test_receive_with_zero_timeout_polls_without_blocking(
        self, broker: Any, queue: str
    ) -> None:
        start = monotonic()
        assert broker.receive(queue, timeout=0) == []
        assert monotonic() - start < self.timing_slack
        sent = _env()
        broker.publish(sent, queue=queue)
        got = eventually(lambda: broker.receive(queue, timeout=0), 10, message="poll")
        assert _ids(got) == [sent.id]

    def test_receive_returns_at_most_max_messages(self, broker: Any, queue: str) -> None:
        sent = [_env() for _ in range(5)]
        broker.publish_many(sent, queue=queue)
        first = eventually(lambda: broker.receive(queue, max_messages=3, timeout=0.5), 10)
        assert 1 <= len(first) <= 3
        rest = _collect(broker, queue, 5 - len(first))
        assert sorted(_ids(first + rest)) == sorted(e.id for e in sent)
        self._assert_empty(broker, queue)

    def test_receive_returns_ready_messages_without_waiting_for_max_messages(
        self, broker: Any, queue: str
    ) -> None:
        broker.publish_many([_env(), _env()], queue=queue)
        start = monotonic()
        got = broker.receive(queue, max_messages=10, timeout=5.0)
        assert 1 <= len(got) <= 2
        assert monotonic() - start < self.timing_slack

    def test_receive_from_several_queues_returns_messages_of_each(
        self, broker: Any, make_queue: Callable[[], str]
    ) -> None:
        first, second = make_queue(), make_queue()
        a, b = _env(b"a"), _env(b"b")
        broker.publish(a, queue=first)
        broker.publish(b, queue=second)
        got = _collect(broker, [first, second], 2)
        assert {(d.queue, d.envelope.id) for d in got} == {(first, a.id), (second, b.id)}

    def test_blocked_receive_wakes_up_when_a_message_arrives(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        producer = new_broker()
        sent = _env()
        timer = threading.Timer(0.3, producer.publish, (sent,), {"queue": queue})
        start = monotonic()
        timer.start()
        try:
            got = broker.receive(queue, timeout=10.0)
        finally:
            timer.join()
        assert _ids(got) == [sent.id]
        assert monotonic() - start < 0.3 + self.timing_slack

    def test_receive_without_queues_raises_configuration_error(self, broker: Any) -> None:
        with pytest.raises(ConfigurationError):
            broker.receive([], timeout=0)

    # ================================================================== ack
    @requires(AT_LEAST_ONCE)
    def test_acked_message_is_not_redelivered_after_its_lease_would_have_expired(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker(lease_seconds=self.short_lease)
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.ack(got)
        self._assert_empty(new_broker(), queue, timeout=self.short_lease + 0.5)
        self._assert_empty(consumer, queue)

    def test_acking_twice_is_a_no_op(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.ack(got)
        broker.ack(got)
        self._assert_empty(broker, queue)

    def test_ack_after_close_raises_connection_lost(
        self, new_broker: BrokerFactory, broker: Any, queue: str
    ) -> None:
        consumer = new_broker()
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.close()
        with pytest.raises(ConnectionLost):
            consumer.ack(got)

    @requires(AT_LEAST_ONCE)
    def test_ack_after_the_lease_was_lost_raises_invalid_receipt_and_loses_nothing(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        slow = new_broker(lease_seconds=self.short_lease)
        other = new_broker()
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(slow, queue, 1)
        [second] = eventually(
            lambda: other.receive(queue, timeout=0.25), 10 + self.short_lease, message="redelivery"
        )
        assert second.envelope.id == sent.id
        assert second.redelivered is True
        if self.detects_lost_leases:
            with pytest.raises(InvalidReceipt):
                slow.ack(first)
        else:
            with contextlib.suppress(InvalidReceipt):
                slow.ack(first)
        other.ack(second)
        self._assert_empty(other, queue)

    # ================================================================== redelivery
    @requires(AT_LEAST_ONCE)
    def test_unacked_message_is_redelivered_after_consumer_closes(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker()
        sent = _env(b"\x00payload\xff")
        broker.publish(sent, queue=queue)
        [first] = _collect(consumer, queue, 1)
        assert first.redelivered is False
        consumer.close()
        successor = new_broker()
        [again] = _collect(successor, queue, 1)
        assert again.redelivered is True
        assert again.envelope.id == sent.id
        assert again.envelope.body == sent.body
        assert again.delivery_count in (None, 2)
        successor.ack(again)

    @requires(AT_LEAST_ONCE)
    def test_unacked_message_is_redelivered_after_consumer_dies_without_closing(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        # "Dies": the consumer is simply never used again; only its lease running out can
        # bring the message back (pain point 3.3: at-least-once after consumer death).
        doomed = new_broker(lease_seconds=self.short_lease)
        sent = _env(b"survives")
        broker.publish(sent, queue=queue)
        [_] = _collect(doomed, queue, 1)
        survivor = new_broker()
        self._assert_empty(survivor, queue)
        [again] = eventually(
            lambda: survivor.receive(queue, timeout=0.25),
            10 + self.short_lease,
            message="redelivery after consumer death",
        )
        assert again.redelivered is True
        assert (again.envelope.id, again.envelope.body) == (sent.id, sent.body)
        survivor.ack(again)

    # ================================================================== processes that die
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

    def test_held_message_is_invisible_to_other_consumers(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        holder = new_broker()
        broker.publish(_env(), queue=queue)
        [held] = _collect(holder, queue, 1)
        self._assert_empty(new_broker(), queue, timeout=0.3)
        if QUEUE_SIZE in broker.capabilities:
            assert broker.size(queue) == 0
        holder.ack(held)

    @requires(AT_LEAST_ONCE)
    def test_expired_lease_redelivers_with_delivery_count_incremented(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker(lease_seconds=self.short_lease)
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(consumer, queue, 1)
        [second] = eventually(lambda: consumer.receive(queue, timeout=0.25), 10 + self.short_lease)
        assert second.envelope.id == sent.id
        assert (first.redelivered, second.redelivered) == (False, True)
        if first.delivery_count is not None:
            assert (first.delivery_count, second.delivery_count) == (1, 2)
        consumer.ack(second)

    @requires(AT_LEAST_ONCE)
    def test_close_is_idempotent_and_releases_held_messages(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker()
        sent = [_env() for _ in range(3)]
        broker.publish_many(sent, queue=queue)
        _collect(consumer, queue, 3)
        consumer.close()
        consumer.close()
        again = _collect(new_broker(), queue, 3, ack=True)
        assert sorted(_ids(again)) == sorted(e.id for e in sent)
        assert all(d.redelivered for d in again)

    def test_every_operation_after_close_raises_connection_lost(
        self, new_broker: BrokerFactory, broker: Any, queue: str
    ) -> None:
        closed = new_broker()
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        closed.close()
        calls: list[Callable[[], object]] = [
            lambda: closed.declare_queue(queue),
            lambda: closed.publish(_env(), queue=queue),
            lambda: closed.publish_many([_env()], queue=queue),
            lambda: closed.receive(queue, timeout=0),
            lambda: closed.purge(queue),
            lambda: closed.ack(got),
            lambda: closed.reject(got, requeue=True),
        ]
        for call in calls:
            with pytest.raises(ConnectionLost):
                call()
        broker.ack(got)

    # ================================================================== reject
    def test_rejected_message_with_requeue_is_ready_again_as_redelivered(
        self, broker: Any, queue: str
    ) -> None:
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(broker, queue, 1)
        broker.reject(first, requeue=True)
        [again] = _collect(broker, queue, 1)
        assert again.envelope.id == sent.id
        assert again.redelivered is True
        broker.ack(again)

    def test_rejected_message_without_requeue_is_not_delivered_again_on_its_queue(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = self._lease_broker(new_broker, broker)
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.reject(got, requeue=False, reason="bad payload")
        self._assert_empty(new_broker(), queue, timeout=self.short_lease + 0.5)

    @requires(DEAD_LETTER)
    def test_rejected_message_lands_in_the_dead_letter_queue_with_same_id_and_body(
        self, broker: Any, queue: str
    ) -> None:
        sent = _env(b"poison", headers={"task": "tasks.explode"})
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.reject(got, requeue=False, reason="ValueError: boom")
        dead_queue = broker.dead_letter_queue(queue)
        assert isinstance(dead_queue, str)
        assert dead_queue != queue
        [dead] = _collect(broker, dead_queue, 1)
        assert (dead.envelope.id, dead.envelope.body) == (sent.id, sent.body)
        assert dead.envelope.headers["task"] == "tasks.explode"
        assert dead.queue == dead_queue
        broker.ack(dead)
        self._assert_empty(broker, queue)
        self._assert_empty(broker, dead_queue)

    @requires(DEAD_LETTER)
    def test_the_dead_letter_records_the_reject_reason_and_the_queue_it_came_from(
        self, broker: Any, queue: str
    ) -> None:
        # Read back through the Broker protocol alone: two headers on the dead letter (see
        # the module doc), next to the headers the message already had.
        reason = (
            'Traceback (most recent call last):\n  File "tasks.py", line 7, in explode\n'
            "ValueError: bad payload: ünïcødé ✓ 'quoted' \"double\"; tab\tend"
        )
        sent = _env(b"poison", headers={"task": "tasks.explode", "retries": 2})
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.reject(got, requeue=False, reason=reason)
        dead_queue = broker.dead_letter_queue(queue)
        [dead] = _collect(broker, dead_queue, 1)
        headers = dict(dead.envelope.headers)
        recorded = headers.get(DEAD_LETTER_REASON_HEADER)
        assert isinstance(recorded, str), f"no reason recorded: {headers!r}"
        # Exactly, or with its tabs and line breaks as spaces (see the module doc).
        assert recorded.split() == reason.split(), (
            f"dead-letter reason recorded as {recorded!r}, expected {reason!r} (exactly, or "
            "with its tabs and line breaks as spaces)"
        )
        assert headers.get(DEAD_LETTER_QUEUE_HEADER) == queue
        assert (headers["task"], headers["retries"]) == ("tasks.explode", 2)
        assert dead.envelope.id == sent.id
        broker.ack(dead)

    def test_rejecting_twice_is_a_no_op(self, broker: Any, queue: str) -> None:
        dropped, requeued = _env(b"dropped"), _env(b"requeued")
        broker.publish_many([dropped, requeued], queue=queue)
        first, second = sorted(_collect(broker, queue, 2), key=lambda d: d.envelope.body)
        broker.reject(first, requeue=False)
        broker.reject(first, requeue=False)
        broker.reject(second, requeue=True)
        broker.reject(second, requeue=True)
        [again] = _collect(broker, queue, 1)
        assert again.envelope.id == requeued.id
        broker.ack(again)
        self._assert_empty(broker, queue, timeout=0.3)

    # ================================================================== ordering
    def test_messages_of_one_priority_are_delivered_in_publish_order(
        self, broker: Any, queue: str
    ) -> None:
        sent = [_env(str(i).encode()) for i in range(100)]
        for envelope in sent:
            broker.publish(envelope, queue=queue)
        got = _collect(broker, queue, 100, ack=True)
        assert _ids(got) == [e.id for e in sent]

    @requires(PRIORITY)
    def test_higher_priority_messages_are_delivered_first(self, broker: Any, queue: str) -> None:
        sent = [_env(priority=p) for p in (0, 5, 9, 1, 3)]
        broker.publish_many(sent, queue=queue)
        got = _collect(broker, queue, len(sent), ack=True)
        assert [d.envelope.priority for d in got] == [9, 5, 3, 1, 0]

    @requires(PRIORITY)
    def test_fifo_holds_within_each_priority(self, broker: Any, queue: str) -> None:
        sent = [_env(f"{i}".encode(), priority=(0, 4, 8)[i % 3]) for i in range(60)]
        for envelope in sent:
            broker.publish(envelope, queue=queue)
        got = _collect(broker, queue, len(sent), ack=True)
        priorities = [d.envelope.priority for d in got]
        assert priorities == sorted(priorities, reverse=True)
        for level in (0, 4, 8):
            expected = [e.id for e in sent if e.priority == level]
            assert [d.envelope.id for d in got if d.envelope.priority == level] == expected

    def test_priority_outside_zero_to_nine_is_refused(self, broker: Any, queue: str) -> None:
        expected: tuple[type[Exception], ...] = (
            (ConfigurationError,)
            if PRIORITY in broker.capabilities
            else (ConfigurationError, UnsupportedFeature)
        )
        for priority in (10, -1, 255):
            with pytest.raises(expected):
                broker.publish(_env(priority=priority), queue=queue)
        self._assert_empty(broker, queue)

    def test_an_envelope_id_that_is_not_a_string_is_refused_at_publish(
        self, broker: Any, queue: str
    ) -> None:
        """Ids are data, never queries: a dict id would be an operator to a document store."""
        for bad in (123, b"bytes", {"$ne": None}, None):
            with pytest.raises(ConfigurationError):
                broker.publish(_env(id=bad), queue=queue)
            with pytest.raises(ConfigurationError):
                broker.publish_many([_env(id=bad)], queue=queue)
        self._assert_empty(broker, queue)

    def test_a_delay_that_is_not_a_finite_non_negative_number_is_refused_at_publish(
        self, broker: Any, queue: str
    ) -> None:
        """Whether or not ``delayed_delivery`` is declared: such a delay is a mistake, never
        a message to hold for ever (or to loop on)."""
        for bad in (float("inf"), float("nan"), -1.0, float("-inf"), True, "10"):
            with pytest.raises(ConfigurationError):
                broker.publish(_env(), queue=queue, delay=bad)
            with pytest.raises(ConfigurationError):
                broker.publish_many([_env()], queue=queue, delay=bad)
        self._assert_empty(broker, queue)

    # ================================================================== delayed delivery
    @requires(DELAYED)
    def test_delayed_message_is_hidden_until_due_then_delivered(
        self, broker: Any, queue: str
    ) -> None:
        delay = 0.5
        sent = _env()
        start = monotonic()
        broker.publish(sent, queue=queue, delay=delay)
        # Only lower bounds on time are asserted: on a loaded machine the publish itself may
        # take longer than the delay, and then the message is rightly ready at once.
        early = broker.receive(queue, timeout=0)
        assert not early or monotonic() - start >= delay, "delivered before it was due"
        if QUEUE_SIZE in broker.capabilities:
            counted = broker.size(queue)
            assert counted == len(early) == 0 or monotonic() - start >= delay
        [got] = early or eventually(lambda: broker.receive(queue, timeout=0.1), 10 + delay)
        assert monotonic() - start >= delay
        assert got.envelope == sent
        assert got.redelivered is False
        broker.ack(got)

    @requires(DELAYED)
    def test_blocking_receive_never_returns_a_delayed_message_early(
        self, broker: Any, queue: str
    ) -> None:
        delay = 0.5
        sent = _env()
        start = monotonic()
        broker.publish(sent, queue=queue, delay=delay)
        got = broker.receive(queue, timeout=delay + 5 + self.timing_slack)
        assert monotonic() - start >= delay
        assert _ids(got) == [sent.id]

    @requires(DELAYED)
    def test_purge_removes_delayed_messages_too(self, broker: Any, queue: str) -> None:
        delay = 0.5
        broker.publish_many([_env() for _ in range(3)], queue=queue, delay=delay)
        broker.publish_many([_env() for _ in range(2)], queue=queue)
        assert broker.purge(queue) == 5
        self._assert_empty(broker, queue, timeout=delay + 0.5)

    @requires(DELAYED, QUEUE_SIZE)
    def test_delayed_messages_are_not_counted_by_size(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(4)], queue=queue, delay=60.0)
        broker.publish(_env(), queue=queue)
        eventually(lambda: broker.size(queue) == 1, 10)
        assert broker.purge(queue) == 5

    @requires(DELAYED)
    def test_thousand_delayed_messages_stay_in_the_broker_until_due(
        self, broker: Any, queue: str
    ) -> None:
        # Pain point 3.2: a consumer never prefetches a not-yet-due message, however many are
        # waiting; what it gets is bounded by max_messages and only ever due messages.
        far = [_env() for _ in range(1000)]
        assert broker.publish_many(far, queue=queue, delay=300.0) == 1000
        now = _env(b"now")
        broker.publish(now, queue=queue)
        got = broker.receive(queue, max_messages=50, timeout=5.0)
        assert _ids(got) == [now.id]
        broker.ack(got[0])
        self._assert_empty(broker, queue, timeout=0.2)
        if QUEUE_SIZE in broker.capabilities:
            assert broker.size(queue) == 0
        soon = [_env() for _ in range(20)]
        delay = 0.5
        start = monotonic()
        broker.publish_many(soon, queue=queue, delay=delay)
        first = eventually(lambda: broker.receive(queue, max_messages=10, timeout=0.25), 10)
        assert monotonic() - start >= delay
        assert 1 <= len(first) <= 10
        rest = _collect(broker, queue, len(soon) - len(first), ack=True)
        assert sorted(_ids(first + rest)) == sorted(e.id for e in soon)
        for delivery in first:
            broker.ack(delivery)
        self._assert_empty(broker, queue)
        assert broker.purge(queue) == 1000

    @requires(DELAYED)
    def test_receive_never_returns_messages_that_are_not_yet_due(
        self, broker: Any, queue: str
    ) -> None:
        earliest: dict[str, float] = {}
        for i in range(20):
            envelope = _env()
            delay = 0.05 * (i % 10) + 0.05
            earliest[envelope.id] = monotonic() + delay
            broker.publish(envelope, queue=queue, delay=delay)
        seen: set[str] = set()
        deadline = monotonic() + 10
        while len(seen) < len(earliest) and monotonic() < deadline:
            batch = broker.receive(queue, max_messages=5, timeout=0.2)
            received_at = monotonic()
            for delivery in batch:
                assert received_at >= earliest[delivery.envelope.id], "delivered before due"
                seen.add(delivery.envelope.id)
                broker.ack(delivery)
        assert seen == set(earliest)

    # ================================================================== lease extension
    @requires(LEASE_EXTENSION, AT_LEAST_ONCE)
    def test_extending_the_lease_keeps_a_long_task_from_redelivery(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        # Pain point 3.1: no duplicate while the holder is alive and renewing its lease.
        lease = self.short_lease
        worker = new_broker(lease_seconds=lease)
        watcher = new_broker()
        broker.publish(_env(), queue=queue)
        [held] = _collect(worker, queue, 1)
        for _ in range(4):  # 4 x half a lease: well past the original lease
            worker.extend(held, lease)
            self._assert_empty(watcher, queue, timeout=lease / 2)
        worker.ack(held)
        self._assert_empty(watcher, queue)

    @requires(LEASE_EXTENSION, AT_LEAST_ONCE)
    def test_extend_after_the_lease_was_lost_raises_invalid_receipt(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        slow = new_broker(lease_seconds=self.short_lease)
        other = new_broker()
        broker.publish(_env(), queue=queue)
        [first] = _collect(slow, queue, 1)
        [second] = eventually(lambda: other.receive(queue, timeout=0.25), 10 + self.short_lease)
        if self.detects_lost_leases:
            with pytest.raises(InvalidReceipt):
                slow.extend(first, self.short_lease)
        other.ack(second)

    @requires(LEASE_EXTENSION)
    def test_extend_after_ack_raises_invalid_receipt(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.ack(got)
        with pytest.raises(InvalidReceipt):
            broker.extend(got, 10.0)

    # ================================================================== purge, size, publish_many
    def test_purge_returns_how_many_messages_it_removed(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(5)], queue=queue)
        assert broker.purge(queue) == 5
        assert broker.purge(queue) == 0
        self._assert_empty(broker, queue)

    def test_purge_leaves_held_messages_alone(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(3)], queue=queue)
        [held] = _collect(broker, queue, 1)
        assert broker.purge(queue) == 2
        broker.ack(held)
        self._assert_empty(broker, queue)

    @requires(QUEUE_SIZE)
    def test_size_counts_ready_messages_only(self, broker: Any, queue: str) -> None:
        assert broker.size(unique_name("never-used")) == 0
        broker.publish_many([_env() for _ in range(3)], queue=queue)
        eventually(lambda: broker.size(queue) == 3, 10)
        [held] = _collect(broker, queue, 1)
        # Servers may report counts with a short lag; the memory broker is exact at once.
        eventually(lambda: broker.size(queue) == 2, 10, message="size 2 with one held")
        broker.ack(held)
        assert broker.size(queue) == 2
        broker.purge(queue)
        eventually(lambda: broker.size(queue) == 0, 10, message="size 0 after purge")

    def test_publish_many_returns_the_count_and_keeps_order(self, broker: Any, queue: str) -> None:
        sent = [_env(bytes([i])) for i in range(50)]
        assert broker.publish_many(iter(sent), queue=queue) == 50
        got = _collect(broker, queue, 50, ack=True)
        assert _ids(got) == [e.id for e in sent]

    def test_publish_many_of_nothing_publishes_nothing(self, broker: Any, queue: str) -> None:
        assert broker.publish_many([], queue=queue) == 0
        self._assert_empty(broker, queue)

    # ================================================================== queues
    def test_declaring_a_queue_twice_is_harmless(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        broker.declare_queue(queue)
        broker.declare_queue(queue)
        assert len(_collect(broker, queue, 1)) == 1

    def test_invalid_queue_names_raise_configuration_error(self, broker: Any) -> None:
        for bad in ("", "nul\x00inside", "tab\tinside", "x" * 201):
            with pytest.raises(ConfigurationError):
                broker.declare_queue(bad)
            with pytest.raises(ConfigurationError):
                broker.publish(_env(), queue=bad)
            with pytest.raises(ConfigurationError):
                broker.receive(bad, timeout=0)

    # ================================================================== feature capabilities
    def test_priority_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        low, high = _env(b"low"), _env(b"high", priority=5)
        broker.publish(low, queue=queue)
        if PRIORITY in broker.capabilities:
            broker.publish(high, queue=queue)
            got = _collect(broker, queue, 2, ack=True)
            assert _ids(got) == [high.id, low.id]
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.publish(high, queue=queue)
            assert info.value.capability == "priority"
            assert _ids(_collect(broker, queue, 1, ack=True)) == [low.id]
            self._assert_empty(broker, queue)

    def test_delayed_delivery_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish(_env(b"zero"), queue=queue, delay=0)
        broker.publish(_env(b"none"), queue=queue, delay=None)
        assert len(_collect(broker, queue, 2, ack=True)) == 2
        later = _env(b"later")
        if DELAYED in broker.capabilities:
            start = monotonic()
            broker.publish(later, queue=queue, delay=0.3)
            [got] = _collect(broker, queue, 1, ack=True)
            assert monotonic() - start >= 0.3
            assert got.envelope.id == later.id
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.publish(later, queue=queue, delay=0.3)
            assert info.value.capability == "delayed_delivery"
            with pytest.raises(UnsupportedFeature):
                broker.publish_many([later], queue=queue, delay=0.3)
            self._assert_empty(broker, queue, timeout=0.5)
        with pytest.raises((ConfigurationError, UnsupportedFeature)):
            broker.publish(_env(), queue=queue, delay=-1.0)

    def test_dead_letter_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        if DEAD_LETTER in broker.capabilities:
            dead_queue = broker.dead_letter_queue(queue)
            assert isinstance(dead_queue, str)
            assert dead_queue not in ("", queue)
            assert broker.receive(dead_queue, timeout=0) == []
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.dead_letter_queue(queue)
            assert info.value.capability == "dead_letter"

    def test_lease_extension_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        if LEASE_EXTENSION in broker.capabilities:
            broker.extend(got, 30.0)
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.extend(got, 30.0)
            assert info.value.capability == "lease_extension"
        broker.ack(got)

    def test_queue_size_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env(), _env()], queue=queue)
        if QUEUE_SIZE in broker.capabilities:
            assert eventually(lambda: broker.size(queue) == 2, 10)
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.size(queue)
            assert info.value.capability == "queue_size"

    # ================================================================== concurrency
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

    # ================================================================== safety and errors
    def test_repr_never_shows_a_password(self, broker: Any) -> None:
        url = getattr(broker, "url", "") or ""
        password = parse_url(url).password if "://" in url else None
        for text in (repr(broker), str(broker)):
            if password:
                assert password not in text
        if password:
            assert "***" in repr(broker)

    def test_unreachable_server_raises_operational_error_within_bounded_time(
        self, unreachable_broker: Callable[[], Any]
    ) -> None:
        # Error translation (pain point 3.6): a dead server surfaces as the retryable
        # OperationalError, never as a driver exception, and never as a hang.
        start = monotonic()
        with pytest.raises(OperationalError):
            gone = unreachable_broker()
            try:
                name = unique_name("unreachable")
                gone.publish(_env(), queue=name)
                gone.receive(name, timeout=0)
            finally:
                with contextlib.suppress(ConveyorError):
                    gone.close()
        assert monotonic() - start < self.unreachable_timeout

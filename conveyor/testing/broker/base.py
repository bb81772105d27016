"""The broker suite's base: the knobs, the fixtures (see :mod:`conveyor.testing.broker`),
the harness that closes and purges what a test built, and helpers every topic uses.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from time import monotonic
from typing import Any, ClassVar

import pytest

from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConveyorError
from conveyor.core.types import Delivery, Envelope
from conveyor.testing.processes import ChildProcess, ProcessRecipe, require_sigkill
from conveyor.testing.support import (
    REQUIRES_ATTR,
    missing_capabilities,
    suite_process_recipe,
    suite_spawner,
    unique_name,
)

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


class BrokerSuite:
    """What the topics of :class:`~conveyor.testing.broker.BrokerConformance` share."""

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
        return suite_process_recipe(broker, _NO_RECIPE)

    @pytest.fixture
    def spawn_broker(self, broker_process_recipe: ProcessRecipe) -> Iterator[SpawnBroker]:
        """``spawn_broker(**options)``: a broker in a new process, killed after the test."""
        require_sigkill()
        with suite_spawner(
            broker_process_recipe, timeout=self.process_timeout, what="broker"
        ) as spawn:
            yield spawn

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

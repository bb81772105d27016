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

Layout: the suite is composed of topic mixins, one module each, over a shared base
(:mod:`~conveyor.testing.broker.base`: knobs, fixtures, helpers): ``messages``,
``receiving``, ``leases``, ``dead_letters``, ``delays``, ``durability``, ``capabilities``
and ``errors``. Subclass :class:`BrokerConformance`, never a mixin alone.
"""

from __future__ import annotations

from conveyor.testing.broker.base import (
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    BrokerFactory,
    SpawnBroker,
)
from conveyor.testing.broker.capabilities import CapabilityChecks
from conveyor.testing.broker.dead_letters import DeadLetterChecks
from conveyor.testing.broker.delays import DelayChecks
from conveyor.testing.broker.durability import DurabilityChecks
from conveyor.testing.broker.errors import ErrorChecks
from conveyor.testing.broker.leases import LeaseChecks
from conveyor.testing.broker.messages import MessageChecks
from conveyor.testing.broker.receiving import ReceiveChecks

__all__ = [
    "DEAD_LETTER_QUEUE_HEADER",
    "DEAD_LETTER_REASON_HEADER",
    "BrokerConformance",
    "BrokerFactory",
    "SpawnBroker",
]


# pytest collects the tests of the last base first (reverse MRO): the topics are listed in
# reverse reading order, so a run reports them messages first, errors last.
class BrokerConformance(
    ErrorChecks,
    CapabilityChecks,
    DurabilityChecks,
    DelayChecks,
    DeadLetterChecks,
    LeaseChecks,
    ReceiveChecks,
    MessageChecks,
):
    """The broker conformance suite. Subclass it as ``Test<Something>``; see the module doc.

    Fixtures a subclass provides: ``make_broker`` (required), ``unreachable_broker_url`` and
    ``broker_process_recipe`` (optional). The last one tells the ``durable`` and
    ``cross_process`` tests how a fresh Python process builds a broker on the same queues
    (``ProcessRecipe("acme.broker:AcmeBroker.from_url", url, {"option": 1})``); by default
    ``type(broker).from_url(broker.url)``, so a broker built from its URL alone needs none.

    The name does not start with ``Test``, so pytest never collects this base class itself.
    """

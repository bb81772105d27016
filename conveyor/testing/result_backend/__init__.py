"""``ResultBackendConformance``: the executable contract of :class:`~conveyor.core.ResultBackend`.

Adopt it by subclassing in a module pytest collects, under a name starting with ``Test``,
and providing ONE fixture, ``make_result_backend``::

    from conveyor.testing.result_backend import ResultBackendConformance

    class TestMyResultBackend(ResultBackendConformance):
        @pytest.fixture
        def make_result_backend(self, tmp_path):
            def make(**options):
                return MyResultBackend.from_url(f"my://{tmp_path}", **options)
            return make

Fixture contract:

* ``make_result_backend`` returns a callable ``make(**options) -> ResultBackend``. Every call
  builds a NEW client on the SAME store (same server, database, directory or in-memory
  store), passing ``options`` on as ``from_url`` keyword options. The suite calls it several
  times in one test (a writer and a reader, two counting clients) and closes every client it
  made at teardown; ``make`` itself must not close them.
* The suite passes ``default_ttl=<seconds>`` to check that a record stored with ``ttl=None``
  still expires. A backend without that option raises ``ConfigurationError`` (as
  :func:`~conveyor.core.options.build_options` does for unknown options); the suite then
  checks the ``default_ttl`` attribute instead.
* Every test uses ids from :func:`~conveyor.testing.support.unique_name`, so the suite runs
  under pytest-xdist against one shared server.

* ``result_backend_process_recipe`` (optional): how ANOTHER process builds a client on the
  same store, a :class:`~conveyor.testing.processes.ProcessRecipe` (an import path, a URL and
  JSON options). The test that wakes a ``wait`` by a store from another process (backends
  declaring ``wait`` and ``cross_process``) starts a fresh Python process with it. The
  default, ``ProcessRecipe.of(result_backend)``, is
  ``type(backend).from_url(backend.url)``: enough for a backend built from its URL alone.
  Override it when ``make`` adds keyword options, e.g.
  ``ProcessRecipe("acme.results:AcmeBackend.from_url", URL, {"namespace": "t"})``.

The suite provides ``result_backend`` (``make()``, closed at teardown),
``new_result_backend`` (the tracking wrapper around ``make``) and ``spawn_result_backend``
(``spawn(**options)``: a client in another process, killed at teardown).

Capabilities: tests marked ``@requires(...)`` skip, naming the missing capability
(``needs capability 'wait'``), when the backend's class does not declare it. Every capability
with an operation (``wait``, ``counters``, ``groups``, ``expiry_sweep``) also has a test that
never skips: declared, the operation works; undeclared, it raises ``UnsupportedFeature``.

Timing knobs (class attributes a subclass may override):

* ``short_ttl`` (float seconds, default 1.0): the TTL used by expiry tests.
* ``expiry_tolerance`` (float seconds, default 1.0): how far past its TTL a store may still
  show an entry (clock granularity, e.g. whole seconds). After ``ttl + expiry_tolerance``
  an expired entry must never be returned, swept or not.
* ``expiry_timeout`` (float seconds, default 5.0): extra time granted to a store that deletes
  lazily before the suite gives up waiting for an entry to disappear.
* ``process_timeout`` (float seconds, default 60.0): bound on each step of a client in
  another process (its start-up, each command).

There is no knob for ``wait``: a declared ``wait`` wakes within 250 ms of the store (the
median of 21 waits; see the tests' comment), or it is not push.

Decisions written into the tests:

* ``date_done`` round-trips as an aware UTC datetime within 1 ms (MongoDB keeps
  milliseconds); exact microseconds are not required.
* ``result``, ``children`` and ``extended`` round-trip as JSON-equal data (``True`` stays a
  bool, ``1.0`` stays a float); ``children`` may come back as ``None`` for ``[]``.
* ``state`` comes back as a :class:`~conveyor.core.types.State` member.
* Once ``close()`` returned, every operation raises
  :class:`~conveyor.core.errors.ConnectionLost` (those of capabilities the backend does not
  declare may raise ``UnsupportedFeature`` instead); ``close()`` itself may be called again.

Layout: the suite is composed of topic mixins, one module each, over a shared base
(:mod:`~conveyor.testing.result_backend.base`: knobs, fixtures, records, helpers):
``storing``, ``expiry``, ``capabilities``, ``waiting``, ``counters``, ``groups`` and
``clients``. Subclass :class:`ResultBackendConformance`, never a mixin alone.
"""

from __future__ import annotations

from conveyor.testing.result_backend.base import MakeResultBackend, SpawnResultBackend, skip_reason
from conveyor.testing.result_backend.base import _caps as _caps  # read by tests of backends
from conveyor.testing.result_backend.capabilities import CapabilityChecks
from conveyor.testing.result_backend.clients import ClientChecks
from conveyor.testing.result_backend.counters import CounterChecks
from conveyor.testing.result_backend.expiry import ExpiryChecks
from conveyor.testing.result_backend.groups import GroupChecks
from conveyor.testing.result_backend.storing import StoreChecks
from conveyor.testing.result_backend.waiting import WaitChecks

__all__ = ["MakeResultBackend", "ResultBackendConformance", "SpawnResultBackend", "skip_reason"]


# pytest collects the tests of the last base first (reverse MRO): the topics are listed in
# reverse reading order, so a run reports them storing first, clients last.
class ResultBackendConformance(
    ClientChecks,
    GroupChecks,
    CounterChecks,
    WaitChecks,
    CapabilityChecks,
    ExpiryChecks,
    StoreChecks,
):
    """Subclass as ``Test<Something>`` and provide ``make_result_backend``; see the module
    docstring for the fixture contract and the timing knobs.

    Optional fixture: ``result_backend_process_recipe``, how a fresh Python process builds a
    client on the same store (for backends declaring ``wait`` and ``cross_process``, whose
    ``wait`` must wake within 250 ms of a store made there). By default
    ``type(backend).from_url(backend.url)``; override it when ``make`` adds options:
    ``ProcessRecipe("acme.results:AcmeBackend.from_url", url, {"namespace": "t"})``.
    """

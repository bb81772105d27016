"""The shipped suites catch what a third party could get wrong.

Each test here writes a small implementation with one plausible mistake into a pytester
directory, adopts the suite there as a third party would (one fixture), runs the suite test
that targets the mistake in a fresh pytest process, and checks that the test fails saying
why. The durable and cross-process mistakes are the kind an in-process suite cannot see:
they keep state per process, which every broker of the test shares, so only the tests that
SIGKILL another process catch them.

The broker mistakes are built on the test-only spool broker (``tests/testing/spool.py``),
which passes the whole suite; the result backend mistakes on the memory backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_SPOOL = Path(__file__).resolve().parent  # spool.py lives beside this file


@pytest.fixture
def third_party(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory where ``import spool`` works (as in tests/testing)."""
    monkeypatch.setenv("PYTHONPATH", str(_SPOOL))
    return pytester


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(**{"test_adopted": textwrap.dedent(source)})
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", *args)


def test_a_broker_that_buffers_publishes_fails_the_durable_test(
    third_party: pytest.Pytester,
) -> None:
    # publish() returns before the message is written; the buffer is flushed by the next
    # receive/close of any broker in the process, so every in-process test passes.
    result = _run(
        third_party,
        """
        import pytest
        from spool import SpoolBroker
        from conveyor.testing import BrokerConformance

        PENDING = []  # one write-behind buffer per process

        class BufferingBroker(SpoolBroker):
            def publish(self, envelope, *, queue, delay=None):
                self._check_open()
                PENDING.append((envelope, queue))

            def _flush(self):
                while PENDING:
                    envelope, queue = PENDING.pop(0)
                    SpoolBroker.publish(self, envelope, queue=queue)

            def receive(self, queues, **kw):
                self._flush()
                return super().receive(queues, **kw)

            def close(self):
                self._flush()
                super().close()

        class TestBuffering(BrokerConformance):
            timing_slack = 0.0

            @pytest.fixture
            def make_broker(self, tmp_path):
                return lambda **o: BufferingBroker.from_url(f"spool://{tmp_path}/q", **o)
        """,
        "-k",
        "sigkilled_right_after_publish or round_trip_preserves",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: received 0 of 4 messages within 10*"])


def test_a_broker_whose_leases_live_in_one_process_fails_the_cross_process_test(
    third_party: pytest.Pytester,
) -> None:
    # Expired leases are reclaimed only when this process handed them out: fine while
    # every consumer is in one process (the in-process "dies without closing" test passes),
    # but a message held by a process that died stays held forever.
    result = _run(
        third_party,
        """
        import os
        import pytest
        import spool
        from conveyor.testing import BrokerConformance

        HANDED_OUT = set()  # leases given out by this process

        class LocalLeaseBroker(spool.SpoolBroker):
            def _claim(self, queue, path, limit):
                got = super()._claim(queue, path, limit)
                HANDED_OUT.update(d.receipt.held_name for d in got)
                return got

            def _reclaim(self, path):
                held = os.path.join(path, "held")
                stash = [n for n in os.listdir(held) if n not in HANDED_OUT]
                hidden = os.path.join(path, "hidden")
                os.makedirs(hidden, exist_ok=True)
                for name in stash:
                    os.rename(os.path.join(held, name), os.path.join(hidden, name))
                try:
                    super()._reclaim(path)
                finally:
                    for name in stash:
                        os.rename(os.path.join(hidden, name), os.path.join(held, name))

        class TestLocalLeases(BrokerConformance):
            short_lease = 0.5

            @pytest.fixture
            def make_broker(self, tmp_path):
                return lambda **o: LocalLeaseBroker.from_url(f"spool://{tmp_path}/q", **o)
        """,
        "-k",
        "sigkilled_consumer_process or dies_without_closing",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*redelivery of a message held by a process SIGKILLed (lease 0.5 s) not met*"]
    )


def test_a_result_backend_that_polls_in_wait_fails_the_wake_up_test(
    third_party: pytest.Pytester,
) -> None:
    # Two ways to declare `wait` and poll: every second, and conveyor's own backing-off
    # poll (wait_for, which a client uses for a backend without `wait`).
    result = _run(
        third_party,
        """
        import time
        import pytest
        from conveyor.backends.memory import MemoryResultBackend, MemoryResultStore
        from conveyor.core import wait_for
        from conveyor.testing import ResultBackendConformance

        class FetchOnly:
            capabilities = frozenset()

            def __init__(self, backend):
                self.fetch = backend.fetch

        class FixedPolling(MemoryResultBackend):
            def wait(self, task_id, timeout):
                deadline = time.monotonic() + timeout
                while True:
                    record = self.fetch(task_id)
                    remaining = deadline - time.monotonic()
                    if (record is not None and record.ready) or remaining <= 0:
                        return record
                    time.sleep(min(1.0, remaining))

        class BackoffPolling(MemoryResultBackend):
            def wait(self, task_id, timeout):
                return wait_for(FetchOnly(self), task_id, timeout)

        class TestFixedPolling(ResultBackendConformance):
            @pytest.fixture
            def make_result_backend(self):
                store = MemoryResultStore()
                return lambda **o: FixedPolling.from_url("memory://", store=store, **o)

        class TestBackoffPolling(TestFixedPolling):
            @pytest.fixture
            def make_result_backend(self):
                store = MemoryResultStore()
                return lambda **o: BackoffPolling.from_url("memory://", store=store, **o)

        class TestPush(TestFixedPolling):
            @pytest.fixture
            def make_result_backend(self):
                store = MemoryResultStore()
                return lambda **o: MemoryResultBackend.from_url("memory://", store=store, **o)
        """,
        "-k",
        "wakes_within_250_ms_of_a_store_from_another_thread",
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*FAILED*TestFixedPolling*", "*FAILED*TestBackoffPolling*"])
    result.stdout.fnmatch_lines(["*wait() woke * ms after the stores (median over 250 ms)*"])


def test_a_result_backend_that_works_after_close_and_a_lost_dead_letter_reason_fail(
    third_party: pytest.Pytester,
) -> None:
    result = _run(
        third_party,
        """
        import pytest
        from conveyor.backends.memory import MemoryResultBackend, MemoryResultStore
        from conveyor.testing import BrokerConformance, ResultBackendConformance
        from conveyor.transports.memory import MemoryBroker, MemoryStore

        class NothingToClose(MemoryResultBackend):
            def close(self):
                pass  # "nothing to release": but the client keeps working

        class ReasonDropping(MemoryBroker):
            def reject(self, delivery, *, requeue=False, reason=""):
                super().reject(delivery, requeue=requeue)

        class TestNothingToClose(ResultBackendConformance):
            @pytest.fixture
            def make_result_backend(self):
                store = MemoryResultStore()
                return lambda **o: NothingToClose.from_url("memory://", store=store, **o)

        class TestReasonDropping(BrokerConformance):
            @pytest.fixture
            def make_broker(self):
                store = MemoryStore()
                return lambda **o: ReasonDropping.from_url("memory://", store=store, **o)
        """,
        "-k",
        "closed_backend_raises_connection_lost or records_the_reject_reason",
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*after close(), ConnectionLost was expected, but:*", "*store returned None*"]
    )
    result.stdout.fnmatch_lines(["*dead-letter reason recorded as '', expected 'Traceback (m*"])

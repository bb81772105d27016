"""A third-party result backend with few capabilities adopts the conformance suite.

The spool backend lives in ``spool_results.py`` next to this file and is reached through a
private :class:`~conveyor.core.registry.Registry` under the scheme ``spoolres``, as a
plugin's own tests would do. Its run shows the other half of the suite: ``@requires`` tests
skip naming the capability (``needs capability 'wait'``), and the operations it does not
declare raise ``UnsupportedFeature``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# pytest puts this directory on sys.path (rootdir-relative "prepend" import mode).
from spool_results import SpoolResultBackend

from conveyor.core import Capability, Registry, ResultRecord, State, result_backend_from_url
from conveyor.testing.result_backend import ResultBackendConformance, skip_reason

_HERE = Path(__file__).resolve().parent


@pytest.fixture
def spool_registry() -> Registry:
    registry = Registry(load_entry_points=False)
    registry.register("result_backend", "spoolres", SpoolResultBackend)
    return registry


class TestSpoolResultBackend(ResultBackendConformance):
    short_ttl = 0.5
    expiry_tolerance = 0.1
    expiry_timeout = 2.0

    @pytest.fixture
    def make_result_backend(self, tmp_path: Path, spool_registry: Registry) -> Callable[..., Any]:
        url = f"spoolres://{tmp_path / 'spool'}"

        def make(**options: Any) -> Any:
            return result_backend_from_url(url, registry=spool_registry, **options)

        return make


@pytest.mark.parametrize(
    ("test_name", "reason"),
    [
        ("test_a_waiter_is_woken_by_a_store_from_another_client", "needs capability 'wait'"),
        ("test_incr_is_atomic_under_threads_and_across_clients", "needs capability 'counters'"),
        ("test_a_group_round_trips_in_member_order", "needs capability 'groups'"),
        ("test_purge_expired_deletes_only_expired_records_in_batches", None),
    ],
)
def test_the_suite_skips_spool_tests_naming_the_missing_capability(
    test_name: str, reason: str | None
) -> None:
    test = getattr(ResultBackendConformance, test_name)
    assert skip_reason(test, SpoolResultBackend.capabilities) == reason


def test_a_record_stored_by_another_process_is_fetched_here(
    tmp_path: Path, spool_registry: Registry
) -> None:
    url = f"spoolres://{tmp_path / 'spool'}"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from spool_results import SpoolResultBackend\n"
        "from conveyor.core import ResultRecord, State\n"
        "b = SpoolResultBackend.from_url(sys.argv[2])\n"
        "b.store(ResultRecord('from-child', State.SUCCESS, {'pid': 'child'}))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(_HERE), url], check=True, timeout=60)
    backend = result_backend_from_url(url, registry=spool_registry)
    record = backend.fetch("from-child")
    assert record == ResultRecord("from-child", State.SUCCESS, {"pid": "child"})
    assert Capability.CROSS_PROCESS in backend.capabilities

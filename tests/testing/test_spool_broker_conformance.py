"""The broker conformance suite against a third-party transport defined only in tests/.

The spool broker declares a small capability set, so this run shows the suite's skips naming
capabilities and its "both directions" tests checking the refusals.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# pytest puts this directory on sys.path (rootdir-relative "prepend" import mode).
from spool import SpoolBroker

from conveyor.core.registry import Registry, broker_from_url
from conveyor.testing.broker import BrokerConformance, BrokerFactory


@pytest.fixture
def spool_registry() -> Registry:
    # A private registry: third-party schemes in tests never leak into default_registry.
    registry = Registry(load_entry_points=False)
    registry.register("broker", "spool", SpoolBroker)
    return registry


class TestSpoolBroker(BrokerConformance):
    @pytest.fixture
    def make_broker(self, tmp_path: Path, spool_registry: Registry) -> BrokerFactory:
        url = f"spool://{tmp_path / 'spool'}"

        def make(**options: object) -> SpoolBroker:
            broker: SpoolBroker = broker_from_url(url, registry=spool_registry, **options)
            return broker

        return make

    @pytest.fixture
    def unreachable_broker_url(self, tmp_path: Path) -> str:
        # A "server" that cannot be reached: the spool directory would live under a file.
        blocker = tmp_path / "not-a-directory"
        blocker.write_bytes(b"")
        return f"spool://{blocker}/spool"

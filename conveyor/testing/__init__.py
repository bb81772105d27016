"""Conformance suites and test helpers, shipped in the wheel for third parties.

Everything a third party's tests need, from one place::

    from conveyor.testing import (
        BrokerConformance, ResultBackendConformance, ProcessRecipe,
        requires, eventually, unique_name, service_unavailable,
    )

Assertion rewriting: pytest shows the compared values of a failing ``assert`` only in modules
it rewrote on import. It rewrites the modules of an installed plugin's distribution, but an
editable install (``pip install -e``) lists no modules, so the suites would fail with a bare
``AssertionError``. This package therefore registers its modules for rewriting before any of
them is imported, and imports them lazily (on first use of a name below): the pytest plugin
(``conveyor.testing.plugin``, loaded in every pytest session) imports this package first, so
the registration always comes first, and a session that never touches a suite never imports
one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pytest

# Before any import of these modules: rewriting applies only to modules imported afterwards.
# A registered name covers its submodules: the suites are packages of topic modules
# (conveyor.testing.broker.leases, conveyor.testing.result_backend.waiting, ...).
pytest.register_assert_rewrite(
    "conveyor.testing.broker",
    "conveyor.testing.processes",
    "conveyor.testing.result_backend",
    "conveyor.testing.support",
)

if TYPE_CHECKING:
    from conveyor.testing.broker import BrokerConformance
    from conveyor.testing.processes import ProcessRecipe
    from conveyor.testing.result_backend import ResultBackendConformance
    from conveyor.testing.support import eventually, requires, service_unavailable, unique_name

__all__ = [
    "BrokerConformance",
    "ProcessRecipe",
    "ResultBackendConformance",
    "eventually",
    "requires",
    "service_unavailable",
    "unique_name",
]

_HOMES = {
    "BrokerConformance": "conveyor.testing.broker",
    "ProcessRecipe": "conveyor.testing.processes",
    "ResultBackendConformance": "conveyor.testing.result_backend",
    "eventually": "conveyor.testing.support",
    "requires": "conveyor.testing.support",
    "service_unavailable": "conveyor.testing.support",
    "unique_name": "conveyor.testing.support",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

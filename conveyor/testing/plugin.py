"""pytest plugin for conveyor's conformance suites (entry point ``pytest11: conveyor``).

Installed with conveyor, so it runs in every pytest session of every project that has
conveyor installed: it must stay tiny, import nothing heavy and change nothing for tests that
do not use conveyor. It only

* registers the suite modules for assertion rewriting, by importing :mod:`conveyor.testing`
  first (whose top does it, before any suite module is imported; the suites themselves are
  imported only when a test uses them), so failures show the compared values even in an
  editable install, whose distribution lists no modules for pytest to rewrite,
* registers the markers the suites use (so ``--strict-markers`` runs accept them), and
* mirrors :func:`conveyor.testing.support.requires` onto a ``conveyor_requires`` marker, so a
  run can select or deselect tests by capability (``-m "not conveyor_requires"``).

The skip itself happens in the suites' autouse fixture, which knows the implementation's
declared capabilities; a collection hook cannot know them.
"""

from __future__ import annotations

import pytest

# Importing the package registers assertion rewriting; only then may a suite module load.
import conveyor.testing  # noqa: F401
from conveyor.testing.support import REQUIRES_ATTR

__all__ = ["pytest_collection_modifyitems", "pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "conveyor_requires(*capabilities): the test needs these conveyor capabilities "
        "(added from @requires; skipped when the implementation lacks them)",
    )
    config.addinivalue_line(
        "markers",
        "requires_service(name): needs a running server; skipped locally when absent, "
        "failure under CI",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        needed = getattr(function, REQUIRES_ATTR, ())
        if needed:
            item.add_marker(pytest.mark.conveyor_requires(*(str(c) for c in needed)))

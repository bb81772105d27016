"""Helpers shared by the conformance suites and by any test of an implementation.

* :func:`requires` marks a test as needing capabilities; the suite skips it, naming the
  capability, when the implementation under test does not declare it.
* :func:`eventually` polls a predicate until it holds or a deadline passes: tests never
  ``sleep()`` and hope.
* :func:`unique_name` gives every test its own queue / key names so suites run in parallel
  (pytest-xdist) against one server.
* :func:`service_unavailable` is the one place that decides between "skip" (locally) and
  "fail" (``CI=true`` or ``CONVEYOR_REQUIRE_SERVICES=1``) when a server is not reachable.
* :func:`suite_process_recipe` and :func:`suite_spawner` are the suites' shared mechanics for
  an implementation built again in another process (:mod:`conveyor.testing.processes`, which
  they import only when called).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

from conveyor.core.capabilities import Capability

if TYPE_CHECKING:
    from conveyor.testing.processes import ChildProcess, ProcessRecipe

__all__ = [
    "REQUIRES_ATTR",
    "eventually",
    "missing_capabilities",
    "requirement_missing",
    "requires",
    "service_unavailable",
    "services_required",
    "suite_process_recipe",
    "suite_spawner",
    "unique_name",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

REQUIRES_ATTR = "__conveyor_requires__"


def requires(*capabilities: Capability | str) -> Callable[[F], F]:
    """Mark a conformance test as needing ``capabilities``.

    The suite's autouse fixture skips the test with a reason naming each missing capability
    (``"needs capability 'delayed_delivery'"``) when the implementation does not declare it.
    """
    needed = tuple(Capability(c) for c in capabilities)

    def decorate(fn: F) -> F:
        setattr(fn, REQUIRES_ATTR, (*getattr(fn, REQUIRES_ATTR, ()), *needed))
        return fn

    return decorate


def missing_capabilities(fn: Any, declared: frozenset[Capability]) -> list[Capability]:
    """The capabilities ``fn`` was marked with that ``declared`` lacks."""
    return [c for c in getattr(fn, REQUIRES_ATTR, ()) if c not in declared]


def eventually(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    max_interval: float = 0.25,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Polls with exponential backoff from ``interval`` to ``max_interval`` seconds.

    Raises:
        AssertionError: ``predicate`` stayed falsy for ``timeout`` seconds; the message names
            ``message`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{message} not met within {timeout:.1f}s (last: {value!r})")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_interval)


def unique_name(prefix: str = "t") -> str:
    """A name no other test (or xdist worker) uses: ``<prefix>-<12 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def services_required() -> bool:
    """True when a missing server must fail the run instead of skipping (CI)."""
    flag = os.environ.get("CONVEYOR_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")
    return flag or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def requirement_missing(reason: str) -> NoReturn:
    """Skip (locally) or fail (CI) because something a test needs is missing: a server
    binary, a tool, a private server that would not start. Like :func:`service_unavailable`,
    a green CI run may never rest on a skipped server test."""
    if services_required():
        pytest.fail(f"{reason} (CI=true or CONVEYOR_REQUIRE_SERVICES=1: it is required)")
    pytest.skip(reason)


def service_unavailable(service: str, url: str, error: BaseException | str) -> NoReturn:
    """Skip (locally) or fail (CI) because ``service`` at ``url`` is not reachable."""
    from conveyor.core.urls import mask_text, mask_url

    reason = f"{service} not reachable at {mask_url(url)}: {mask_text(str(error))}"
    if services_required():
        pytest.fail(f"{reason} (CI=true or CONVEYOR_REQUIRE_SERVICES=1: servers are required)")
    pytest.skip(reason)


def suite_process_recipe(implementation: Any, reason: str) -> ProcessRecipe:
    """The suites' default ``*_process_recipe`` fixture: ``ProcessRecipe.of(implementation)``
    (``type(x).from_url(x.url)`` in another process), or skip the test with ``reason`` when
    that cannot be built there."""
    from conveyor.testing.processes import ProcessRecipe

    recipe = ProcessRecipe.of(implementation)
    if recipe is None:
        pytest.skip(reason)
    return recipe


@contextlib.contextmanager
def suite_spawner(
    recipe: ProcessRecipe, *, timeout: float, what: str
) -> Iterator[Callable[..., ChildProcess]]:
    """``spawn(**options)``: a :class:`~conveyor.testing.processes.ChildProcess` built from
    ``recipe``; every child spawned is closed (killed) when the block ends."""
    from conveyor.testing.processes import ChildProcess

    children: list[ChildProcess] = []

    def spawn(**options: Any) -> ChildProcess:
        child = ChildProcess(recipe, options=options, timeout=timeout, what=what)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()

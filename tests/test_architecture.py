"""The layering of the package (docs/index.md, "Layout"), checked on every run.

Every ``import`` and ``from ... import`` statement of every module under ``conveyor/`` is
read with :mod:`ast` (those inside functions too: a lazy import is still a dependency), and
each must be allowed by the rules below. A module over :data:`MAX_LINES` lines fails too.

* ``conveyor.core`` (the contract) imports only itself;
* ``conveyor._drivers`` (per-server client plumbing) imports only core and itself;
* a transport imports only core, ``_drivers``, its own package and ``transports._common``;
  a result backend only core, ``_drivers`` and its own package: no transport imports a
  backend or another transport, and the reverse;
* ``conveyor.testing`` (the shipped suites) imports neither the runtime, the CLI nor an
  implementation (the suites are given one by the third party's fixtures);
* ``conveyor.runtime`` never imports the CLI, a transport or a backend (it selects them by
  URL through the registry);
* ``conveyor.integrations`` may import core and the runtime, never the CLI.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "conveyor"
#: The longest module, in lines.
MAX_LINES = 800


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import of ``path``."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from conveyor import transports` names a module too
                yield node.lineno, f"{target}.{alias.name}"


def _store(module: str, kind: str) -> str | None:
    """``conveyor.transports.redis.broker`` -> ``conveyor.transports.redis``."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["conveyor", kind]:
        return ".".join(parts[:3])
    return None


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _refusal(source: str, target: str) -> str | None:
    """Why ``source`` may not import ``target``, or None when it may."""
    if not _under(target, "conveyor") or target in ("conveyor",):
        return None
    if _under(source, "conveyor.core"):
        if not _under(target, "conveyor.core"):
            return "core imports only core"
    elif _under(source, "conveyor._drivers"):
        if not _under(target, "conveyor.core", "conveyor._drivers"):
            return "_drivers imports only core and _drivers"
    elif _under(source, "conveyor.transports", "conveyor.backends"):
        kind = "transports" if _under(source, "conveyor.transports") else "backends"
        shared = (
            "conveyor.transports._common" if kind == "transports" else "conveyor.backends._sqlids"
        )
        own = _store(source, kind)
        if _under(target, "conveyor.core", "conveyor._drivers", shared):
            return None
        if own is not None and _under(target, own):
            return None
        if target == f"conveyor.{kind}":
            return None
        return f"a {kind[:-1]} imports only core, _drivers, its own package and {shared}"
    elif _under(source, "conveyor.testing"):
        if _under(
            target, "conveyor.runtime", "conveyor.cli", "conveyor.transports", "conveyor.backends",
            "conveyor.integrations", "conveyor._drivers",
        ):  # fmt: skip
            return "the suites import neither the runtime, the CLI nor an implementation"
    elif _under(source, "conveyor.runtime"):
        if _under(target, "conveyor.cli", "conveyor.transports", "conveyor.backends",
                  "conveyor._drivers", "conveyor.integrations"):  # fmt: skip
            return "the runtime imports neither the CLI nor an implementation"
    elif _under(source, "conveyor.integrations") and _under(target, "conveyor.cli"):
        return "an integration never imports the CLI"
    return None


def _violations() -> list[str]:
    found = []
    for path in _modules():
        source = _name(path)
        for line, target in _imports(path):
            why = _refusal(source, target)
            if why is not None:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {target}: {why}")
    return found


def test_the_layers_import_only_what_they_may() -> None:
    assert _violations() == []


def test_no_module_outgrows_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("conveyor.core.base", "conveyor.runtime.app"),
        ("conveyor.core.registry", "conveyor.transports.redis"),
        ("conveyor.backends.redis", "conveyor.transports.redis"),
        ("conveyor.transports.redis.broker", "conveyor.transports.amqp"),
        ("conveyor.transports.amqp.broker", "conveyor.backends.rpc"),
        ("conveyor.testing.broker", "conveyor.runtime.worker"),
        ("conveyor.runtime.app", "conveyor.cli"),
        ("conveyor.backends.redis", "conveyor.transports._common"),
        ("conveyor.backends.mongodb", "conveyor.backends.sqlalchemy.ids"),
        ("conveyor._drivers.redis", "conveyor.transports.redis"),
        ("conveyor.integrations.celery", "conveyor.cli"),
    ],
)
def test_the_rules_refuse_what_the_design_forbids(source: str, target: str) -> None:
    """A guard on the guard: each forbidden edge is refused (an always-None _refusal would
    make the first test vacuous)."""
    assert _refusal(source, target) is not None


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("conveyor.transports.redis.broker", "conveyor.transports.redis.envelope"),
        ("conveyor.transports.redis.broker", "conveyor._drivers.redis"),
        ("conveyor.backends.redis", "conveyor._drivers.redis"),
        ("conveyor.backends.rpc", "conveyor._drivers.amqp.link"),
        ("conveyor.runtime.app", "conveyor.core.registry"),
        ("conveyor.testing.broker", "conveyor.core.types"),
        ("conveyor.cli", "conveyor.runtime.app"),
    ],
)
def test_the_rules_allow_what_the_design_allows(source: str, target: str) -> None:
    assert _refusal(source, target) is None

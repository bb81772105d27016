"""brotli is installable as ``conveyor[brotli]`` (>= 1.2, the first release whose decoder
can be bounded), is part of ``conveyor[all]``, and tox's ``memory`` env installs it, so CI
runs the brotli decompression-bound tests instead of skipping them (issue 13, item 7)."""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    return importlib.metadata.metadata("conveyor").get_all("Requires-Dist") or []


def test_the_brotli_extra_asks_for_a_brotli_that_can_be_bounded() -> None:
    assert "brotli" in (importlib.metadata.metadata("conveyor").get_all("Provides-Extra") or [])
    assert 'brotli>=1.2; extra == "brotli"' in _requirements()


def test_the_all_extra_includes_brotli() -> None:
    [everything] = [r for r in _requirements() if r.endswith('extra == "all"')]
    extras = everything.split("[", 1)[1].split("]", 1)[0].split(",")
    assert "brotli" in extras


def test_the_memory_tox_env_installs_brotli() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    extras = tox["testenv:memory"]["extras"].split()
    assert "brotli" in extras

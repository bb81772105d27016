"""A failing assert inside a shipped suite shows the compared values, however conveyor is installed.

pytest rewrites the asserts of a module only when it knows, before the import, that the
module needs it. For an installed plugin it learns that from the distribution's file list,
which an editable install (``pip install -e``) does not have; ``conveyor.testing`` therefore
registers its modules itself. Each test runs pytest in a fresh process (a module imported
once cannot be rewritten later) on a third party's adoption of a suite whose implementation
is wrong on purpose, and looks for the values in the failure.

Two ways to load the plugin: from its entry point, as in any project with conveyor installed
(in this repository's editable ``.venv`` this is the case the registration fixes), and with
plugin autoloading off and ``-p conveyor.testing.plugin``, where pytest marks nothing of
conveyor's distribution for rewriting in any kind of install: there, only the registration
can make the values appear.
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

_ADOPTION = """
    import pytest
    from conveyor.backends.memory import MemoryResultBackend, MemoryResultStore
    from conveyor.testing import (
        BrokerConformance,
        ResultBackendConformance,
        eventually,
        requires,
        service_unavailable,
        unique_name,
    )
    from conveyor.transports.memory import MemoryBroker, MemoryStore

    class MiscountingBroker(MemoryBroker):
        def purge(self, queue):
            super().purge(queue)
            return 4242

    class RecordForAnything(MemoryResultBackend):
        def fetch(self, task_id):
            return "BOGUS-RECORD"

    class TestMiscounting(BrokerConformance):
        @pytest.fixture
        def make_broker(self):
            store = MemoryStore()
            return lambda **o: MiscountingBroker.from_url("memory://", store=store, **o)

    class TestRecordForAnything(ResultBackendConformance):
        @pytest.fixture
        def make_result_backend(self):
            store = MemoryResultStore()
            return lambda **o: RecordForAnything.from_url("memory://", store=store, **o)

    def test_the_helpers_are_importable_from_the_package():
        assert callable(eventually) and callable(requires)
        assert callable(service_unavailable) and unique_name("x").startswith("x-")
"""

_SELECTED = (
    "purge_returns_how_many or fetch_of_an_unknown_id_returns_none or helpers_are_importable"
)


@pytest.mark.parametrize(
    "loading",
    ["entry point", "-p conveyor.testing.plugin without autoload"],
)
def test_a_failing_assert_in_a_suite_module_shows_the_compared_values(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, loading: str
) -> None:
    pytester.makepyfile(test_adopted=textwrap.dedent(_ADOPTION))
    args = ["-p", "no:cacheprovider", "-k", _SELECTED]
    if loading.startswith("-p"):
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        args += ["-p", "conveyor.testing.plugin"]
    else:
        args += ["-p", "no:xdist"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*def test_purge_returns_how_many_messages_it_removed*",
            "E   *assert 4242 == 5",
            "E        +  where 4242 = purge(*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*def test_fetch_of_an_unknown_id_returns_none*",
            "E   *assert 'BOGUS-RECORD' is None",
            "E        +  where 'BOGUS-RECORD' = fetch(*",
        ]
    )
    result.stdout.no_fnmatch_line("*PytestAssertRewriteWarning*")


def test_importing_the_package_loads_no_suite_module() -> None:
    # The plugin imports conveyor.testing in every pytest session of every project with
    # conveyor installed: that must stay cheap, and the suite modules must load only after
    # the registration, on first use.
    import subprocess
    import sys

    code = (
        "import sys, conveyor.testing, conveyor.testing.plugin\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('conveyor.testing.'))\n"
        "print(loaded)\n"
        "from conveyor.testing import BrokerConformance\n"
        "print('conveyor.testing.broker' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.splitlines() == [
        "['conveyor.testing.plugin', 'conveyor.testing.support']",
        "True",
    ]

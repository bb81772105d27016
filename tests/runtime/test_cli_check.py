"""``conveyor check``: bounded by --timeout, and an unknown option's value never printed.

The stores here are conveyor's own (memory); the same bound against real servers that never
answer is in tests/faults/test_hostile_secrets.py (test_check_gives_up_within_its_timeout...).
"""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner

from conveyor.cli import main
from conveyor.core.errors import OperationTimeout
from conveyor.runtime import check as check_module
from conveyor.runtime.check import run_check


def test_check_of_a_memory_broker_passes_within_its_timeout() -> None:
    result = CliRunner().invoke(main, ["check", "memory://", "-n", "3", "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert "publish" in result.output


def test_the_timeout_option_is_documented_and_refuses_a_negative_value() -> None:
    assert "--timeout" in CliRunner().invoke(main, ["check", "--help"]).output
    result = CliRunner().invoke(main, ["check", "memory://", "--timeout", "-1"])
    assert result.exit_code != 0


def test_a_probe_that_never_returns_ends_in_operation_timeout() -> None:
    """The bound itself: a probe blocked on an event nobody sets (as a driver blocked on a
    socket that never answers) is abandoned after the timeout."""
    release = threading.Event()

    def stuck(url: str, rounds: int) -> check_module.Report:
        release.wait(60)
        raise AssertionError("released")

    started = time.monotonic()
    try:
        with pytest.raises(OperationTimeout, match=r"no answer within 0\.5s"):
            check_module._bounded(stuck, "memory://", 1, 0.5)
    finally:
        release.set()
    assert time.monotonic() - started < 30  # far below the probe's own 60 s


def test_a_probe_error_reaches_the_caller_with_its_type() -> None:
    def failing(url: str, rounds: int) -> check_module.Report:
        raise OperationTimeout("published message not received")

    with pytest.raises(OperationTimeout, match="not received"):
        check_module._bounded(failing, "memory://", 1, 5.0)


def test_an_unknown_option_is_named_but_its_value_is_not_printed() -> None:
    result = CliRunner().invoke(main, ["check", "memory://?pasword=QZ40", "-n", "1"])
    assert result.exit_code != 0
    assert "unknown option 'pasword'" in result.output
    assert "pasword=***" in result.output
    assert "QZ40" not in result.output


def test_run_check_with_no_timeout_still_runs() -> None:
    rows, _caps, what = run_check("memory://", rounds=2, timeout=None)
    assert what == "broker"
    assert [r[0] for r in rows] == ["publish", "receive", "ack"]

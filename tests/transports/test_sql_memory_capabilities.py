"""SQLite ``:memory:`` lives in one process: the SQL broker and result backend built on it
declare neither ``durable`` nor ``cross_process`` on the instance (the class keeps them for
files and servers), and everything that reads capabilities reads the instance's set: the
shipped suites (their SIGKILL tests skip instead of failing) and ``conveyor check``
(issue 13, item 13)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.cli import main
from conveyor.core.capabilities import Capability
from conveyor.testing.result_backend import _caps
from conveyor.transports.sqlalchemy import SQLAlchemyBroker

PROCESS_BOUND = {Capability.DURABLE, Capability.CROSS_PROCESS}


def test_an_in_memory_sqlite_broker_is_neither_durable_nor_cross_process(tmp_path: Path) -> None:
    memory = SQLAlchemyBroker.from_url("sqla+sqlite://")
    on_file = SQLAlchemyBroker.from_url(f"sqla+sqlite:///{tmp_path / 'b.db'}")
    try:
        assert not PROCESS_BOUND & memory.capabilities
        assert Capability.AT_LEAST_ONCE in memory.capabilities
        assert on_file.capabilities >= PROCESS_BOUND
        assert SQLAlchemyBroker.capabilities >= PROCESS_BOUND
        shared = SQLAlchemyBroker(memory.engine)  # another broker on the same engine
        assert not PROCESS_BOUND & shared.capabilities
    finally:
        memory.close()
        on_file.close()


def test_an_in_memory_sqlite_result_backend_is_neither_durable_nor_cross_process(
    tmp_path: Path,
) -> None:
    memory = SQLAlchemyResultBackend.from_url("db+sqlite://")
    on_file = SQLAlchemyResultBackend.from_url(f"db+sqlite:///{tmp_path / 'r.db'}")
    try:
        assert not PROCESS_BOUND & memory.capabilities
        assert not PROCESS_BOUND & _caps(memory)  # what the shipped suite reads
        assert Capability.GROUPS in memory.capabilities
        assert on_file.capabilities >= PROCESS_BOUND
        assert SQLAlchemyResultBackend.capabilities >= PROCESS_BOUND
    finally:
        memory.close()
        on_file.close()


def test_conveyor_check_reports_the_instances_capabilities() -> None:
    result = CliRunner().invoke(main, ["check", "sqla+sqlite://", "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "at_least_once" in result.output
    assert "durable" not in result.output
    assert "cross_process" not in result.output

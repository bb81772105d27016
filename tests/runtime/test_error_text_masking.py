"""No secret in what the worker logs, in a failure's reason, or in a test skip reason
(issue 13, item 5): every text built from an error goes through ``mask_text``, whoever
raised it (here a third-party broker whose errors quote its URL, and a task whose error
quotes a password)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from conveyor import App
from conveyor.core.errors import ConnectionLost
from conveyor.runtime.execution import describe
from conveyor.testing.support import service_unavailable
from conveyor.transports.memory import MemoryBroker

SECRET = "QZs3cr3t"
LEAKY_URL = f"leaky://user:{SECRET}@broker.example:5672/"


class LeakyBroker(MemoryBroker):
    """A memory broker whose first receives fail with a driver text quoting its URL, the
    way careless third-party brokers do."""

    failures = 3

    def receive(self, queues: Any, **kwargs: Any) -> Any:
        if LeakyBroker.failures > 0:
            LeakyBroker.failures -= 1
            raise ConnectionLost(f"cannot reach {LEAKY_URL} (password={SECRET})")
        return super().receive(queues, **kwargs)


def test_the_worker_logs_no_secret_from_a_brokers_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = App("leak", broker="memory://", backend="memory://")
    app._broker = LeakyBroker()  # built here: how a URL finds it is not what is tested
    LeakyBroker.failures = 2

    @app.task(name="leak.ok")
    def ok() -> str:
        return "ok"

    worker = app.Worker(pool="solo", receive_timeout=0.1)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(30)
        assert ok.delay().get(timeout=30) == "ok"
    finally:
        worker.stop()
        thread.join(30)
        app.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "receive failed" in logged
    assert SECRET not in logged


def test_a_failure_reason_shows_no_secret() -> None:
    error = ValueError(f"login to redis://u:{SECRET}@h/0 failed; password={SECRET}")
    text = describe(error)
    assert SECRET not in text
    assert text.startswith("ValueError: login to redis://u:***@h/0")


def test_a_huge_error_is_described_within_its_limit() -> None:
    assert len(describe(ValueError("x" * 10_000_000))) <= 500


def test_a_skip_for_an_unreachable_service_shows_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CONVEYOR_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        service_unavailable("Redis", LEAKY_URL, OSError(f"refused: {LEAKY_URL}"))
    assert SECRET not in str(info.value)


class RefusingBroker(MemoryBroker):
    def publish(self, envelope: Any, **kwargs: Any) -> None:
        raise ConnectionLost(f"publish to {LEAKY_URL} failed (password={SECRET})")


def test_a_cli_error_shows_no_secret() -> None:
    from click.testing import CliRunner

    from conveyor.cli import main

    app = App("leak", broker="memory://", backend="memory://", task_publish_retry=False)
    app._broker = RefusingBroker()
    try:
        result = CliRunner().invoke(main, ["call", "leak.any"], obj=app)
    finally:
        app.close()
    assert result.exit_code != 0
    assert "publish to" in result.output
    assert SECRET not in result.output

"""The worker bounds every decode of a message by its own settings (issue 13, item 7 wired
into the runtime): ``worker_max_message_size`` stops decompression of a body while it
inflates, and ``accept_compression`` names the methods a body may use, in every pool (the
prefork child decodes too) and for protocol v1 bodies (decoded before running, for their
task name). A refused message is dead-lettered without running and writes no result; the
other messages of the batch run and the worker goes on serving.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import pytest
from failpaths import Runs, make_app, running

from conveyor import App, Envelope
from conveyor.core.compression import normalize_accept_compression
from conveyor.runtime.execution import inspect_envelope

POOLS = ["solo", "threads", "prefork"]
#: The worker's limit in these tests, and a value that inflates far past it.
LIMIT = 64 * 1024
BIG = "a" * (4 * LIMIT)


def _settled(app: App, queue: str = "celery") -> tuple[int, int]:
    broker = app.broker
    return broker.size(queue), broker.size(broker.dead_letter_queue(queue))


def _dead_letter_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dead-lettering" in r.getMessage()]


@pytest.mark.parametrize("pool", POOLS)
def test_a_body_inflating_past_worker_max_message_size_is_dead_lettered_unrun(
    pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The compressed body is a few hundred bytes (under the limit, so the size check on
    the raw body passes); it inflates to four times the limit."""
    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    app = make_app("memory", tmp_path, worker_max_message_size=LIMIT)
    runs = Runs(tmp_path / "runs")

    @app.task(name="dl.echo", bind=True)
    def echo(self: Any, value: str) -> int:
        runs.mark(self.request.id)
        return len(value)

    try:
        before = echo.delay("x")
        bomb = echo.apply_async((BIG,), compression="zlib")
        after = echo.delay("yy")
        with running(app, pool=pool, concurrency=1) as (worker, thread):
            assert before.get(timeout=30) == 1
            assert after.get(timeout=30) == 2
            assert echo.delay("zzz").get(timeout=30) == 3  # still serving
            assert thread.is_alive()
        assert runs.count(bomb.id) == 0
        assert _settled(app) == (0, 1)
        assert app.backend.fetch(bomb.id) is None  # a refused message writes no result
        reasons = _dead_letter_reasons(caplog)
        # refused while decompressing, not for its raw size ("exceeds worker_max_message_size")
        assert any(f"exceeds the limit of {LIMIT} bytes" in r for r in reasons), reasons
        assert worker.stats["dead_lettered"] == 1
    finally:
        app.close()


@pytest.mark.parametrize("pool", POOLS)
def test_a_compression_method_outside_accept_compression_is_dead_lettered_unrun(
    pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    app = make_app("memory", tmp_path, accept_compression=["zlib"])
    runs = Runs(tmp_path / "runs")

    @app.task(name="dl.echo", bind=True)
    def echo(self: Any, value: str) -> str:
        runs.mark(self.request.id)
        return value

    try:
        refused = echo.apply_async(("bz",), compression="bzip2")
        allowed = echo.apply_async(("gz",), compression="zlib")
        plain = echo.delay("plain")
        with running(app, pool=pool, concurrency=1) as (_, thread):
            assert allowed.get(timeout=30) == "gz"
            assert plain.get(timeout=30) == "plain"
            assert thread.is_alive()
        assert runs.count(refused.id) == 0
        assert _settled(app) == (0, 1)
        assert app.backend.fetch(refused.id) is None
        reasons = _dead_letter_reasons(caplog)
        assert any("accept_compression" in r for r in reasons), reasons
    finally:
        app.close()


def test_no_accept_compression_refuses_every_compressed_body(tmp_path: Path) -> None:
    app = make_app("memory", tmp_path, accept_compression=None)
    runs = Runs(tmp_path / "runs")

    @app.task(name="dl.echo", bind=True)
    def echo(self: Any, value: str) -> str:
        runs.mark(self.request.id)
        return value

    try:
        refused = echo.apply_async(("gz",), compression="zlib")
        plain = echo.delay("plain")
        with running(app, pool="solo") as _:
            assert plain.get(timeout=30) == "plain"
        assert runs.count(refused.id) == 0
        assert _settled(app) == (0, 1)
    finally:
        app.close()


def _v1_envelope(body: bytes, compression: str | None) -> Envelope:
    headers: dict[str, Any] = {} if compression is None else {"compression": compression}
    return Envelope(
        id="v1-id",
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
    )


def test_a_protocol_v1_body_is_bounded_when_read_for_its_task_name() -> None:
    """Protocol v1 keeps the task name in the body, so the worker decodes it before running:
    that decode honours the same limit and methods."""
    body = json.dumps({"task": "t", "id": "v1-id", "args": [BIG], "kwargs": {}}).encode()
    packed = _v1_envelope(zlib.compress(body), "zlib")
    accept_all = normalize_accept_compression(("zlib", "bzip2"))
    refused = inspect_envelope(
        packed, max_size=LIMIT, signer=None, accept=("json",), accept_compression=accept_all
    )
    assert isinstance(refused, str)
    assert f"exceeds the limit of {LIMIT} bytes" in refused
    not_accepted = inspect_envelope(
        packed,
        max_size=len(body) + 1,
        signer=None,
        accept=("json",),
        accept_compression=normalize_accept_compression(("bzip2",)),
    )
    assert isinstance(not_accepted, str)
    assert "accept_compression" in not_accepted
    read = inspect_envelope(
        packed,
        max_size=len(body) + 1,
        signer=None,
        accept=("json",),
        accept_compression=accept_all,
    )
    assert not isinstance(read, str)
    assert read[:2] == ("t", "v1-id")

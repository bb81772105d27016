"""Issue 13 on the memory broker, and the shared helpers every broker records dead letters
with: reasons are recorded whatever they are (bounded, printable, never raising), and a delay
the store cannot hold is refused at publish with a non-transient error.

The memory broker keeps envelopes as objects, so it has nothing to decode: its malformed
input is what ``publish`` refuses (tests/transports/test_memory_transport.py covers priorities).
"""

from __future__ import annotations

import threading

import pytest

from conveyor import App
from conveyor.core.errors import ConfigurationError, DecodeError
from conveyor.core.types import Envelope
from conveyor.transports._common import (
    EXACT_MS_MAX_DELAY,
    MAX_REASON_CHARS,
    ORIGINAL_HEADER,
    check_delay,
    clamp_priority,
    clean_reason,
    clean_text,
    undecodable_reason,
)
from conveyor.transports.memory import DEAD_LETTER_REASON_HEADER, MemoryBroker


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


ODD_REASONS = [
    "x" * 10_000_000,
    "nul\x00bell\x07 esc\x1b[31m del\x7f c1\x85",
    "lone \ud800 surrogate \udfff",
    "line\nbreaks\r\nand\ttabs",
    ValueError("an exception"),
    Unprintable(),
    None,
    b"bytes \xff",
]


@pytest.mark.parametrize("reason", ODD_REASONS, ids=range(len(ODD_REASONS)))
def test_every_reason_is_recorded_as_bounded_printable_text(reason: object) -> None:
    broker = MemoryBroker()
    broker.publish(Envelope(id="r", body=b"{}"), queue="q")
    [got] = broker.receive("q", timeout=0)
    broker.reject(got, requeue=False, reason=reason)  # type: ignore[arg-type]
    [dead] = broker.receive(broker.dead_letter_queue("q"), timeout=0)
    recorded = dead.envelope.headers[DEAD_LETTER_REASON_HEADER]
    assert isinstance(recorded, str)
    assert len(recorded) <= MAX_REASON_CHARS
    recorded.encode("utf-8")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in recorded)


def test_clean_text_keeps_ordinary_text_and_marks_what_it_cut() -> None:
    assert clean_reason("task failed: ValueError('x')") == "task failed: ValueError('x')"
    assert clean_reason("\u00e9\u4e2d\U0001f600") == "\u00e9\u4e2d\U0001f600"
    assert clean_reason("a\n\tb") == "a b"
    assert clean_reason("a\x00b") == "a\ufffdb"
    assert clean_text("y" * 50, 10) == "yyyyyyy..."
    assert clean_reason(Unprintable()) == "<unprintable Unprintable>"


def test_undecodable_reasons_say_what_was_wrong() -> None:
    assert undecodable_reason(DecodeError("headers are not a map")) == (
        "undecodable message: headers are not a map"
    )
    assert undecodable_reason(OverflowError("cannot convert float infinity")) == (
        "undecodable message: OverflowError: cannot convert float infinity"
    )


@pytest.mark.parametrize("delay", [EXACT_MS_MAX_DELAY * 2, 1e308])
def test_a_delay_the_memory_broker_cannot_hold_is_refused(delay: float) -> None:
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="longer than the memory broker can hold"):
        broker.publish(Envelope(id="d", body=b"{}"), queue="q", delay=delay)
    with pytest.raises(ConfigurationError):
        broker.publish_many([Envelope(id="d", body=b"{}")], queue="q", delay=delay)
    assert broker.purge("q") == 0


def test_check_delay_names_the_limit_and_lets_ordinary_delays_through() -> None:
    for fine in (None, 0, -0.0, 1.5, EXACT_MS_MAX_DELAY):
        check_delay(fine, EXACT_MS_MAX_DELAY, "x", "why")
    with pytest.raises(ConfigurationError, match=r"at most 4\.5036e\+12s .*142,71\d years; why"):
        check_delay(EXACT_MS_MAX_DELAY + 1, EXACT_MS_MAX_DELAY, "x", "why")


def test_stored_priorities_are_clamped_and_non_integers_refused() -> None:
    assert [clamp_priority(p) for p in (-5, 0, 4, 9, 42, 2**70)] == [0, 0, 4, 9, 9, 9]
    for bad in (True, 3.5, "5", None, [1]):
        with pytest.raises(ValueError, match="integer"):
            clamp_priority(bad)


@pytest.mark.parametrize("headers", [["not", "a", "map"], None, "text", 42], ids=repr)
def test_a_message_whose_headers_are_not_a_map_is_dead_lettered_not_lost(headers: object) -> None:
    """Before, ``reject`` settled the message and then raised TypeError building the dead
    letter: the message was gone from both queues."""
    broker = MemoryBroker()
    broker.publish(Envelope(id="odd", body=b"{}", headers=headers), queue="q")  # type: ignore[arg-type]
    [got] = broker.receive("q", timeout=1)
    broker.reject(got, requeue=False, reason="undecodable message: headers")
    [dead] = broker.receive(broker.dead_letter_queue("q"), timeout=1)
    assert dead.envelope.id == "odd"
    assert dead.envelope.headers[DEAD_LETTER_REASON_HEADER] == "undecodable message: headers"
    assert dead.envelope.headers[ORIGINAL_HEADER] == str(headers)
    assert broker.size("q") == 0


def test_a_worker_dead_letters_a_memory_message_whose_headers_are_not_a_map() -> None:
    app = App("mh", broker="memory://", backend="memory://", worker_lease_seconds=1.0)

    @app.task(name="mh.ok")
    def ok() -> str:
        return "ok"

    broker = app.broker
    broker.publish(Envelope(id="odd", body=b"{}", headers=["x"]), queue="celery")  # type: ignore[arg-type]
    worker = app.Worker(pool="solo", receive_timeout=0.1)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(30)
        assert ok.delay().get(timeout=30) == "ok"
    finally:
        worker.stop()
        thread.join(30)
    assert broker.size(broker.dead_letter_queue("celery")) == 1
    assert broker.size("celery") == 0
    app.close()

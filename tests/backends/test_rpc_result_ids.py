"""The ``rpc://`` result backend against hostile ids, a closed client, unencodable results,
push ``wait`` latency and secrets (issue 13). A task id travels as the AMQP
``correlation_id`` (a short string), so ids over 255 bytes are refused up front.

Checks shared with the other backends live in ``hostileids.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.amqp import UNREACHABLE_AMQP_URL, amqp_url  # noqa: F401
from support.hostileids import (
    NOT_STRINGS,
    ODD_IDS,
    assert_closed_backend_raises_connection_lost,
    assert_lookalikes_never_meet,
    assert_odd_id_is_exact_or_refused,
    assert_refused_everywhere,
    assert_unencodable_result_is_an_encode_error,
    assert_wait_wakes_within,
    odd_id,
)

from conveyor.backends.rpc import RPCResultBackend
from conveyor.core.errors import ConfigurationError, ConveyorError, OperationalError
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name
from conveyor.transports.amqp import AMQPBroker

SECRET = "s3cr3t-amqp-pw"


@pytest.fixture
def make(amqp_url: str) -> Iterator[Callable[..., RPCResultBackend]]:  # noqa: F811
    """Clients sharing one reply queue (writers publish to it, one reader consumes it)."""
    reply_to = unique_name("rpc-ids")
    made: list[RPCResultBackend] = []

    def build(**options: Any) -> RPCResultBackend:
        backend = RPCResultBackend.from_url(
            "rpc://", broker_url=amqp_url, reply_to=reply_to, **options
        )
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()
    deleter = AMQPBroker.from_url(amqp_url)
    try:
        with contextlib.suppress(ConveyorError):
            deleter.delete_queue(reply_to, dead_letters=False)
    finally:
        deleter.close()


@pytest.fixture
def backend(make: Callable[..., RPCResultBackend]) -> RPCResultBackend:
    return make()


@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_ids_that_are_not_strings_are_refused_everywhere(
    backend: RPCResultBackend, bad: Any
) -> None:
    assert_refused_everywhere(backend, bad)


def test_ids_that_are_not_strings_never_reach_the_broker() -> None:
    backend = RPCResultBackend.from_url(
        "rpc://", broker_url=UNREACHABLE_AMQP_URL, operation_timeout=1.0, connect_timeout=0.5
    )
    try:
        for bad in NOT_STRINGS[:4]:
            assert_refused_everywhere(backend, bad)
        with pytest.raises(OperationalError):
            backend.fetch("a-proper-id")  # the control: a real id does reach the broker
    finally:
        backend.close()


@pytest.mark.parametrize("name", list(ODD_IDS))
def test_an_odd_id_is_stored_exactly_or_refused_everywhere(
    backend: RPCResultBackend, name: str
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    refused = {"NUL", "lone surrogate", "escaped surrogate", "10,000 characters"}
    refused.add("1025 UTF-8 bytes")
    assert stored is (name not in refused)


def test_an_id_longer_than_an_amqp_short_string_is_refused_and_says_so(
    backend: RPCResultBackend,
) -> None:
    fits = "x" * 255
    backend.validate_task_id(fits)
    too_long = "é" * 128  # 256 bytes as UTF-8
    with pytest.raises(ConfigurationError, match="at most 255"):
        backend.validate_task_id(too_long)
    with pytest.raises(ConfigurationError, match="correlation id"):
        backend.store(
            ResultRecord("ok-id", State.SUCCESS, 1, extended={"correlation_id": too_long}),
            ttl=60,
        )


def test_lookalike_ids_never_read_or_delete_each_other(backend: RPCResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


def test_a_closed_backend_raises_connection_lost_everywhere(
    make: Callable[..., RPCResultBackend],
) -> None:
    assert_closed_backend_raises_connection_lost(make())


def test_a_result_that_cannot_be_encoded_is_an_encode_error(backend: RPCResultBackend) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


def test_wait_wakes_within_250_ms_of_a_store_from_another_client(
    make: Callable[..., RPCResultBackend],
) -> None:
    waiter, writer = make(), make()
    waiter.declare_reply_queue()
    assert_wait_wakes_within(waiter, writer)


def test_no_password_shows_in_errors_or_reprs() -> None:
    broker_url = UNREACHABLE_AMQP_URL.replace("guest:guest@", f"user:{SECRET}@")
    backend = RPCResultBackend.from_url(
        "rpc://", broker_url=broker_url, operation_timeout=1.0, connect_timeout=0.5
    )
    try:
        with pytest.raises(OperationalError) as info:
            backend.fetch("some-task")
        for text in (str(info.value), repr(backend), repr(backend.options)):
            assert SECRET not in text
    finally:
        backend.close()

"""Malformed input never escapes as anything but a SerializationError (issue 13, item 3).

``peek``, ``parse_envelope``, ``decode_meta``, ``record_from_meta`` and ``group_from_meta``
read data from outside: whatever it is, they return or raise a
:class:`~conveyor.core.errors.SerializationError` (a ``DecodeError`` chained to the real
exception), never OverflowError, RecursionError, KeyError, TypeError, ... that would stop a
worker or make it give the message back for ever.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.core.celery import (
    MAX_TIME_LIMIT,
    TaskMessage,
    build_envelope,
    decode_meta,
    group_from_meta,
    parse_envelope,
    peek,
    record_from_meta,
)
from conveyor.core.errors import DecodeError, SerializationError
from conveyor.core.types import Envelope

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(10**5000 // 10**4000),  # an int too long to print
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.binary(max_size=20),
    st.sampled_from(["", "2024-13-45T99:99", "9999-12-31T23:59:59+14:00", "0001-01-01T00:00"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
_header_names = st.sampled_from(
    [
        "task",
        "id",
        "eta",
        "expires",
        "timelimit",
        "retries",
        "group_index",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "compression",
        "root_id",
        "parent_id",
        "group",
        "argsrepr",
        "shadow",
        "ignore_result",
        "x-user",
    ]
)
_headers = st.one_of(
    st.dictionaries(st.one_of(_header_names, st.integers()), _values, max_size=8),
    _values,  # not even a map
)


def _bodies() -> st.SearchStrategy[bytes]:
    def dump(value: Any) -> bytes:
        try:
            return json.dumps(value, default=repr).encode()
        except (ValueError, TypeError):
            return b"[]"

    return st.one_of(
        st.binary(max_size=60),
        _values.map(dump),
        st.just(b"[" * 100_000 + b"]" * 100_000),  # nested deeper than the recursion limit
        st.just(b'[[], {}, {"chain": Infinity}]'),
        st.just(b'[[1e999], {"a": NaN}, null]'),
    )


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    headers = draw(_headers)
    if isinstance(headers, dict) and draw(st.booleans()):
        headers = {"task": "t", "id": "i", **headers}
    return Envelope(
        id=draw(st.text(max_size=5)),
        body=draw(_bodies()),
        content_type=draw(
            st.sampled_from(["application/json", "application/x-msgpack", "text/x", "", None])
        ),
        headers=headers,
    )


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(envelope=envelopes())
def test_peek_and_parse_envelope_raise_nothing_but_serialization_errors(
    envelope: Envelope,
) -> None:
    for read in (peek, parse_envelope):
        with contextlib.suppress(SerializationError):
            read(envelope)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(meta=_values, payload=_bodies())
def test_result_readers_raise_nothing_but_serialization_errors(meta: Any, payload: bytes) -> None:
    for read in (
        lambda: record_from_meta(meta),
        lambda: record_from_meta(meta, "tid"),
        lambda: group_from_meta(meta),
        lambda: group_from_meta(meta, "gid"),
        lambda: decode_meta(payload),
        lambda: decode_meta(b"\x00celery-compressed\x00application/x-gzip\x00" + payload),
        lambda: decode_meta(b"\x00celery-compressed\x00no-such\x00" + payload),
    ):
        with contextlib.suppress(SerializationError):
            read()


def _v2(**headers: Any) -> Envelope:
    env = build_envelope(TaskMessage(task="t", id="i"))
    return Envelope(id="i", body=env.body, headers={**env.headers, **headers})


def test_deeply_nested_json_is_a_decode_error_chained_to_the_recursion_error() -> None:
    env = Envelope(id="i", body=b"[" * 100_000 + b"]" * 100_000, headers={"task": "t", "id": "i"})
    with pytest.raises(DecodeError) as info:
        parse_envelope(env)
    assert isinstance(info.value.__cause__, RecursionError)


def test_headers_that_are_not_a_map_are_a_decode_error_for_peek_too() -> None:
    env = Envelope(id="i", body=b"[]", headers=["task", "t"])  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="must be a map"):
        peek(env)
    with pytest.raises(DecodeError, match="must be a map"):
        parse_envelope(env)


@pytest.mark.parametrize(
    "timelimit",
    [
        ["30", None],
        [None, "10"],
        [True, None],
        [math.nan, None],
        [math.inf, None],
        [-1, None],
        [MAX_TIME_LIMIT * 2, None],
        [10**400, None],
        [[1], None],
        [1, 2, 3],
        "30",
        {"hard": 1},
    ],
)
def test_a_timelimit_that_is_not_two_bounded_numbers_is_refused(timelimit: Any) -> None:
    with pytest.raises(DecodeError, match="timelimit"):
        parse_envelope(_v2(timelimit=timelimit))


@pytest.mark.parametrize(
    ("timelimit", "expected"),
    [
        ([None, None], (None, None)),
        ([30, 25.5], (30, 25.5)),
        ([0, 0], (0, 0)),  # 0: no limit, as in Celery
        ([MAX_TIME_LIMIT, None], (MAX_TIME_LIMIT, None)),
        (None, (None, None)),
    ],
)
def test_a_valid_timelimit_is_read_as_sent(timelimit: Any, expected: Any) -> None:
    assert parse_envelope(_v2(timelimit=timelimit)).timelimit == expected


def test_a_json_infinity_in_a_header_is_refused_not_an_overflow() -> None:
    body = build_envelope(TaskMessage(task="t", id="i")).body
    headers = json.loads('{"task": "t", "id": "i", "timelimit": [Infinity, null]}')
    with pytest.raises(DecodeError):
        parse_envelope(Envelope(id="i", body=body, headers=headers))
    with pytest.raises(DecodeError):
        parse_envelope(_v2(retries=float("inf")))


@pytest.mark.parametrize(
    ("name", "value"),
    [("retries", -1), ("retries", 2**31), ("group_index", -5), ("replaced_task_nesting", 2**40)],
)
def test_counters_out_of_range_are_refused(name: str, value: int) -> None:
    with pytest.raises(DecodeError, match=name):
        parse_envelope(_v2(**{name: value}))


def test_a_header_name_that_is_not_a_string_is_refused() -> None:
    env = _v2()
    with pytest.raises(DecodeError, match="header names"):
        parse_envelope(Envelope(id="i", body=env.body, headers={**env.headers, 7: "seven"}))


def test_a_huge_bad_value_is_quoted_short_in_the_error() -> None:
    with pytest.raises(DecodeError) as info:
        parse_envelope(_v2(retries="9" * 100_000))
    assert len(str(info.value)) < 300


def test_an_eta_that_overflows_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="out of range"):
        peek(_v2(eta="9999-12-31T23:59:59-23:59"))  # parses, but is past year 9999 in UTC
    # v1 messages read naive times in local time: year 1 overflows there
    body = json.dumps({"task": "t", "id": "i", "args": [], "kwargs": {}, "utc": False,
                       "eta": "0001-01-01T00:00:00"}).encode()  # fmt: skip
    with contextlib.suppress(SerializationError):
        parse_envelope(Envelope(id="i", body=body))

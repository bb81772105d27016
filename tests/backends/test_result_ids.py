"""Ids are data (issue 13): the id rules of ResultBackendBase, and the in-memory result
backend against hostile ids, a closed client, unencodable results and push ``wait``.

The other backends run the same checks against their servers in the files named after
the service (``test_<service>_result_ids.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
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

from conveyor.backends.memory import MemoryResultBackend, MemoryResultStore
from conveyor.core.base import MAX_ID_BYTES, ResultBackendBase, check_id
from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError, EncodeError
from conveyor.core.protocols import ResultBackend
from conveyor.core.types import ResultRecord, State


@pytest.fixture
def backend() -> Iterator[MemoryResultBackend]:
    b = MemoryResultBackend.from_url("memory://")
    yield b
    b.close()


# ================================================================== check_id, the base rules
@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_check_id_refuses_every_value_that_is_not_a_string(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="must be a str, got"):
        check_id(bad)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "must not be empty"),
        ("a\x00b", "NUL"),
        ("a\ud800b", "lone surrogate at index 1"),
        ("\udcff", "lone surrogate at index 0"),
        ("x" * (MAX_ID_BYTES + 1), f"{MAX_ID_BYTES + 1} bytes long"),
        ("é" * (MAX_ID_BYTES // 2 + 1), f"{MAX_ID_BYTES + 2} bytes long"),
    ],
)
def test_check_id_says_which_rule_an_odd_string_breaks(value: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        check_id(value, "group id")


def test_check_id_accepts_spaces_control_characters_and_any_valid_unicode() -> None:
    for value in ("a b", " a", "a ", "a\tb\nc\x7f", "tâche-\U0001f600", "x" * MAX_ID_BYTES):
        assert check_id(value) is value


def test_an_error_about_a_huge_id_does_not_repeat_the_id() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_id("x" * 100_000)
    assert len(str(info.value)) < 300


def test_an_id_with_a_hostile_repr_is_still_refused_clearly() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    with pytest.raises(ConfigurationError, match="must be a str, got Hostile"):
        check_id(Hostile())


class _Liar(str):
    """A str subclass whose methods lie about its content."""

    def __contains__(self, item: object) -> bool:
        return False

    def isascii(self) -> bool:
        return True

    def __len__(self) -> int:
        return 1

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"x"

    def __str__(self) -> str:
        return "something-else"

    def __format__(self, spec: str) -> str:
        return "something-else"

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


def test_a_str_subclass_is_checked_by_its_content_and_used_as_a_plain_str() -> None:
    for hidden in ("a\x00b", "a\ud800b", "é" * 600):
        with pytest.raises(ConfigurationError):
            check_id(_Liar(hidden))
    plain = check_id(_Liar("an-honest-id"))
    assert type(plain) is str
    assert plain == "an-honest-id"


def test_a_str_subclass_id_is_stored_under_its_content(backend: MemoryResultBackend) -> None:
    backend.store(ResultRecord(_Liar("liar-1"), State.SUCCESS, 1), ttl=60)
    backend.store(ResultRecord("liar-2", State.SUCCESS, 2), ttl=60)
    one = backend.fetch("liar-1")
    assert one is not None
    assert (type(one.task_id), one.task_id, one.result) == (str, "liar-1", 1)
    two = backend.fetch(_Liar("liar-2"))  # its __eq__/__hash__ would match anything
    assert two is not None
    assert two.result == 2


def test_validate_task_id_is_part_of_the_result_backend_contract() -> None:
    assert hasattr(ResultBackend, "validate_task_id")
    assert ResultBackend.validate_task_id.__doc__
    assert "ConfigurationError" in ResultBackend.validate_task_id.__doc__


class _LoopingBackend(ResultBackendBase):
    """A third-party backend that relies on the base's derived fetch_many."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.NATIVE_TTL})

    def __init__(self) -> None:
        self.fetched: list[Any] = []

    def fetch(self, task_id: str) -> ResultRecord | None:
        self.fetched.append(task_id)
        return None


def test_the_derived_fetch_many_checks_every_id_before_fetching_any() -> None:
    backend = _LoopingBackend()
    with pytest.raises(ConfigurationError):
        backend.fetch_many(["fine", {"$ne": None}])
    assert backend.fetched == []
    with pytest.raises(ConfigurationError, match="sequence of task ids"):
        backend.fetch_many("a-str-is-not-a-sequence-of-ids")
    backend.validate_task_id("fine")
    with pytest.raises(ConfigurationError):
        backend.validate_task_id(b"fine")


def test_a_ttl_that_is_not_a_number_is_a_configuration_error(
    backend: MemoryResultBackend,
) -> None:
    for bad in ("60", True, float("nan"), -1):
        with pytest.raises(ConfigurationError):
            backend.store(ResultRecord("ttl-id", State.SUCCESS, 1), ttl=bad)


# ================================================================== the memory backend
@pytest.mark.parametrize("bad", NOT_STRINGS, ids=repr)
def test_memory_refuses_ids_that_are_not_strings_on_every_method(
    backend: MemoryResultBackend, bad: Any
) -> None:
    before = len(backend.memory_store)
    assert_refused_everywhere(backend, bad)
    assert len(backend.memory_store) == before


@pytest.mark.parametrize("name", list(ODD_IDS))
def test_memory_stores_an_odd_id_exactly_or_refuses_it_everywhere(
    backend: MemoryResultBackend, name: str
) -> None:
    stored = assert_odd_id_is_exact_or_refused(backend, odd_id(name))
    refused = {"NUL", "lone surrogate", "escaped surrogate", "10,000 characters"}
    refused.add("1025 UTF-8 bytes")
    assert stored is (name not in refused)


def test_memory_never_takes_one_lookalike_id_for_another(backend: MemoryResultBackend) -> None:
    assert_lookalikes_never_meet(backend)


def test_a_closed_memory_backend_raises_connection_lost_everywhere(
    backend: MemoryResultBackend,
) -> None:
    assert_closed_backend_raises_connection_lost(backend)


def test_memory_refuses_a_result_json_cannot_encode_as_a_real_store_would(
    backend: MemoryResultBackend,
) -> None:
    assert_unencodable_result_is_an_encode_error(backend)


def test_memory_checks_results_with_the_configured_serializer() -> None:
    pytest.importorskip("msgpack")
    backend = MemoryResultBackend.from_url("memory://?serializer=msgpack")
    backend.store(ResultRecord("bytes-result", State.SUCCESS, b"\x00\xff"), ttl=60)
    with pytest.raises(EncodeError):
        backend.store(ResultRecord("object-result", State.SUCCESS, object()), ttl=60)
    with pytest.raises(ConfigurationError):
        MemoryResultBackend.from_url("memory://?serializer=no-such-serializer")


def test_memory_wait_wakes_within_250_ms_of_a_store_from_another_client() -> None:
    store = MemoryResultStore()
    waiter = MemoryResultBackend.from_url("memory://", store=store)
    writer = MemoryResultBackend.from_url("memory://", store=store)
    try:
        assert_wait_wakes_within(waiter, writer)
    finally:
        waiter.close()
        writer.close()

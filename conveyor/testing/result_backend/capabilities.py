"""Result backend suite, capabilities: the declared set is known and matches the protocols,
and each operation works when declared and raises ``UnsupportedFeature`` when not. These
tests never skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conveyor.core.capabilities import RESULT_BACKEND_CAPABILITIES, Capability
from conveyor.core.errors import UnsupportedFeature
from conveyor.core.protocols import Counters, ExpirySweep, Groups, ResultBackend, Wait
from conveyor.core.types import GroupRecord, State
from conveyor.testing.result_backend.base import (
    _DATE_DONE,
    ResultBackendSuite,
    _assert_same_record,
    _caps,
    _record,
)
from conveyor.testing.support import unique_name


class CapabilityChecks(ResultBackendSuite):
    """Each capability with an operation, declared or not, checked both ways."""

    def test_capabilities_are_a_frozenset_of_result_backend_capabilities(
        self, result_backend: Any
    ) -> None:
        caps = type(result_backend).capabilities
        assert isinstance(caps, frozenset)
        assert all(isinstance(c, Capability) for c in caps)
        assert caps <= RESULT_BACKEND_CAPABILITIES, caps - RESULT_BACKEND_CAPABILITIES

    def test_the_backend_satisfies_the_protocols_it_declares(self, result_backend: Any) -> None:
        assert isinstance(result_backend, ResultBackend)
        caps = _caps(result_backend)
        for capability, protocol in (
            (Capability.WAIT, Wait),
            (Capability.COUNTERS, Counters),
            (Capability.GROUPS, Groups),
            (Capability.EXPIRY_SWEEP, ExpirySweep),
        ):
            if capability in caps:
                assert isinstance(result_backend, protocol), f"declares {capability} only"

    def test_wait_works_when_declared_and_is_refused_otherwise(self, result_backend: Any) -> None:
        record = _record(unique_name("task"), State.SUCCESS, "ready")
        result_backend.store(record)
        if Capability.WAIT in _caps(result_backend):
            _assert_same_record(result_backend.wait(record.task_id, 5.0), record)
        else:
            with pytest.raises(UnsupportedFeature) as info:
                result_backend.wait(record.task_id, 5.0)
            assert info.value.capability == "wait"

    def test_counters_work_when_declared_and_are_refused_otherwise(
        self, result_backend: Any
    ) -> None:
        key = unique_name("counter")
        if Capability.COUNTERS in _caps(result_backend):
            assert result_backend.incr(key) == 1
            result_backend.forget_key(key)
            assert result_backend.add_member(key, "m") == 1
            result_backend.forget_key(key)
            return
        calls: list[Callable[[], object]] = [
            lambda: result_backend.incr(key),
            lambda: result_backend.add_member(key, "m"),
            lambda: result_backend.forget_key(key),
        ]
        for call in calls:
            with pytest.raises(UnsupportedFeature) as info:
                call()
            assert info.value.capability == "counters"

    def test_groups_work_when_declared_and_are_refused_otherwise(self, result_backend: Any) -> None:
        group = GroupRecord(unique_name("group"), (unique_name("task"),), _DATE_DONE)
        if Capability.GROUPS in _caps(result_backend):
            result_backend.store_group(group)
            assert result_backend.fetch_group(group.group_id) is not None
            result_backend.forget_group(group.group_id)
            return
        calls: list[Callable[[], object]] = [
            lambda: result_backend.store_group(group),
            lambda: result_backend.fetch_group(group.group_id),
            lambda: result_backend.forget_group(group.group_id),
        ]
        for call in calls:
            with pytest.raises(UnsupportedFeature) as info:
                call()
            assert info.value.capability == "groups"

    def test_purge_expired_works_when_declared_and_is_refused_otherwise(
        self, result_backend: Any
    ) -> None:
        if Capability.EXPIRY_SWEEP in _caps(result_backend):
            assert result_backend.purge_expired(batch_size=10) >= 0
            return
        with pytest.raises(UnsupportedFeature) as info:
            result_backend.purge_expired()
        assert info.value.capability == "expiry_sweep"

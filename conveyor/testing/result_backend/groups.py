"""Result backend suite, groups: a group record round-trips in member order, is forgotten
alone, and expires.
"""

from __future__ import annotations

from typing import Any

from conveyor.core.capabilities import Capability
from conveyor.core.types import GroupRecord, State
from conveyor.testing.result_backend.base import (
    _DATE_DONE,
    ResultBackendSuite,
    _assert_same_record,
    _assert_same_time,
    _record,
)
from conveyor.testing.support import requires, unique_name


class GroupChecks(ResultBackendSuite):
    """Group records, stored beside the results of their members."""

    @requires(Capability.GROUPS)
    def test_a_group_round_trips_in_member_order(self, result_backend: Any) -> None:
        members = tuple(f"{unique_name('m')}-{i:03d}" for i in range(100))[::-1]
        group = GroupRecord(unique_name("group"), members, _DATE_DONE)
        result_backend.store_group(group)
        got = result_backend.fetch_group(group.group_id)
        assert isinstance(got, GroupRecord)
        assert got.group_id == group.group_id
        assert tuple(got.task_ids) == members
        _assert_same_time(got.date_done, _DATE_DONE, "group date_done")

    @requires(Capability.GROUPS)
    def test_fetch_group_of_an_unknown_id_returns_none(self, result_backend: Any) -> None:
        assert result_backend.fetch_group(unique_name("group")) is None

    @requires(Capability.GROUPS)
    def test_forget_group_deletes_only_the_group_and_is_idempotent(
        self, result_backend: Any
    ) -> None:
        member = _record(unique_name("task"), State.SUCCESS, 1)
        result_backend.store(member)
        group = GroupRecord(unique_name("group"), (member.task_id,), _DATE_DONE)
        result_backend.store_group(group)
        result_backend.forget_group(group.group_id)
        assert result_backend.fetch_group(group.group_id) is None
        result_backend.forget_group(group.group_id)
        _assert_same_record(result_backend.fetch(member.task_id), member)

    @requires(Capability.GROUPS)
    def test_a_group_expires_after_its_ttl(self, result_backend: Any) -> None:
        group = GroupRecord(unique_name("group"), (unique_name("task"),), _DATE_DONE)
        result_backend.store_group(group, ttl=self.short_ttl)
        self._eventually_gone(
            result_backend, lambda: result_backend.fetch_group(group.group_id) is None, "group"
        )

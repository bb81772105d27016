"""Result backend suite, expiry: records expire after their TTL (or the finite default),
natively or by ``purge_expired``, and an expired record is never returned.
"""

from __future__ import annotations

import math
import time
from typing import Any

from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError
from conveyor.core.types import State
from conveyor.testing.result_backend.base import (
    _LONG_TTL,
    MakeResultBackend,
    ResultBackendSuite,
    _assert_same_record,
    _caps,
    _record,
)
from conveyor.testing.support import requires, unique_name


class ExpiryChecks(ResultBackendSuite):
    """Nothing is kept for ever, and nothing expired is ever returned."""

    def test_a_record_expires_after_its_ttl(self, result_backend: Any) -> None:
        record = _record(unique_name("task"), State.SUCCESS, "short-lived")
        before = time.monotonic()
        result_backend.store(record, ttl=self.short_ttl)
        got = result_backend.fetch(record.task_id)
        if time.monotonic() - before < self.short_ttl / 2:
            _assert_same_record(got, record)
        self._eventually_gone(
            result_backend, lambda: result_backend.fetch(record.task_id) is None, "record"
        )

    def test_an_expired_record_is_never_returned_even_before_any_sweep(
        self, result_backend: Any
    ) -> None:
        expiring = _record(unique_name("task"), State.SUCCESS, "gone")
        keeper = _record(unique_name("task"), State.SUCCESS, "kept")
        result_backend.store(keeper, ttl=_LONG_TTL)
        result_backend.store(expiring, ttl=self.short_ttl)
        self._past_expiry(time.monotonic())
        assert result_backend.fetch(expiring.task_id) is None
        found = result_backend.fetch_many([expiring.task_id, keeper.task_id])
        assert set(found) == {keeper.task_id}

    def test_a_later_store_sets_a_new_ttl(self, result_backend: Any) -> None:
        task_id = unique_name("task")
        result_backend.store(_record(task_id, State.STARTED, None), ttl=self.short_ttl)
        final = _record(task_id, State.SUCCESS, "lives on")
        result_backend.store(final, ttl=_LONG_TTL)
        self._past_expiry(time.monotonic())
        self._sweep_if_needed(result_backend)
        _assert_same_record(result_backend.fetch(task_id), final)

    def test_a_record_stored_without_a_ttl_still_expires(
        self, new_result_backend: MakeResultBackend
    ) -> None:
        try:
            backend = new_result_backend(default_ttl=self.short_ttl)
        except ConfigurationError:
            backend = new_result_backend()
            default = getattr(backend, "default_ttl", None)
            assert isinstance(default, float), (
                "without a default_ttl option the backend must expose a float `default_ttl`"
            )
            assert 0 < default < math.inf, f"default_ttl {default!r} means 'keep forever'"
            return
        record = _record(unique_name("task"), State.SUCCESS, "default ttl")
        backend.store(record)
        self._eventually_gone(backend, lambda: backend.fetch(record.task_id) is None, "record")

    def test_the_default_ttl_is_finite(self, result_backend: Any) -> None:
        assert hasattr(result_backend, "default_ttl"), (
            "expose `default_ttl` (seconds; ResultBackendBase provides it)"
        )
        default = result_backend.default_ttl
        assert isinstance(default, (int, float)), f"default_ttl {default!r} must be seconds"
        assert not isinstance(default, bool)
        assert 0 < default < math.inf, f"default_ttl {default!r}: there is no 'forever' default"

    def test_expired_records_are_deleted_natively_or_by_a_sweep(self, result_backend: Any) -> None:
        caps = _caps(result_backend)
        assert Capability.NATIVE_TTL in caps or Capability.EXPIRY_SWEEP in caps, (
            "a result backend must declare native_ttl or expiry_sweep, or expired records "
            "accumulate forever"
        )

    @requires(Capability.EXPIRY_SWEEP)
    def test_purge_expired_deletes_only_expired_records_in_batches(
        self, result_backend: Any
    ) -> None:
        expiring = [_record(unique_name("task"), State.SUCCESS, i) for i in range(5)]
        keepers = [_record(unique_name("task"), State.SUCCESS, i) for i in range(3)]
        for record in keepers:
            result_backend.store(record, ttl=_LONG_TTL)
        for record in expiring:
            result_backend.store(record, ttl=self.short_ttl)
        self._past_expiry(time.monotonic())
        purged = result_backend.purge_expired(batch_size=2)
        assert isinstance(purged, int)
        if Capability.NATIVE_TTL not in _caps(result_backend):
            assert purged >= len(expiring), f"purged {purged} of {len(expiring)} expired"
        found = result_backend.fetch_many([r.task_id for r in expiring + keepers])
        assert set(found) == {r.task_id for r in keepers}
        assert result_backend.purge_expired(batch_size=1) >= 0
        assert set(result_backend.fetch_many([r.task_id for r in keepers])) == set(found)

"""The suites' public face and their exact set of tests, whatever modules they live in.

``BrokerConformance`` and ``ResultBackendConformance`` are composed from topic mixins (one
module per topic). A third party relies on the imports below and on the suite running every
test it ran before: a test lost, renamed, or left without its ``@requires`` in a move fails
here. The expected sets were recorded from the classes as they were before the split; a new
suite test is added to them on purpose.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest

import conveyor.testing
from conveyor.testing.support import REQUIRES_ATTR

#: Recorded from the single-module BrokerConformance before the split (issue 14).
BROKER_TESTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "test_a_delay_that_is_not_a_finite_non_negative_number_is_refused_at_publish": ((), ()),
    "test_a_message_held_by_a_sigkilled_consumer_process_is_redelivered_to_another": (
        ("cross_process", "at_least_once"),
        (),
    ),
    "test_ack_after_close_raises_connection_lost": ((), ()),
    "test_ack_after_the_lease_was_lost_raises_invalid_receipt_and_loses_nothing": (
        ("at_least_once",),
        (),
    ),
    "test_acked_message_is_not_redelivered_after_its_lease_would_have_expired": (
        ("at_least_once",),
        (),
    ),
    "test_acking_twice_is_a_no_op": ((), ()),
    "test_an_envelope_id_that_is_not_a_string_is_refused_at_publish": ((), ()),
    "test_binary_body_with_all_256_byte_values_round_trips": ((), ()),
    "test_blocked_receive_wakes_up_when_a_message_arrives": ((), ()),
    "test_blocking_receive_never_returns_a_delayed_message_early": (("delayed_delivery",), ()),
    "test_broker_satisfies_the_broker_protocol": ((), ()),
    "test_close_is_idempotent_and_releases_held_messages": (("at_least_once",), ()),
    "test_dead_letter_capability_in_both_directions": ((), ()),
    "test_declared_capabilities_are_known_broker_capabilities": ((), ()),
    "test_declaring_a_queue_twice_is_harmless": ((), ()),
    "test_delayed_delivery_capability_in_both_directions": ((), ()),
    "test_delayed_message_is_hidden_until_due_then_delivered": (("delayed_delivery",), ()),
    "test_delayed_messages_are_not_counted_by_size": (("delayed_delivery", "queue_size"), ()),
    "test_empty_body_round_trips": ((), ()),
    "test_empty_receive_returns_an_empty_list_after_its_timeout": ((), ()),
    "test_envelope_round_trip_preserves_every_field": ((), ()),
    "test_every_operation_after_close_raises_connection_lost": ((), ()),
    "test_expired_lease_redelivers_with_delivery_count_incremented": (("at_least_once",), ()),
    "test_extend_after_ack_raises_invalid_receipt": (("lease_extension",), ()),
    "test_extend_after_the_lease_was_lost_raises_invalid_receipt": (
        ("lease_extension", "at_least_once"),
        (),
    ),
    "test_extending_the_lease_keeps_a_long_task_from_redelivery": (
        ("lease_extension", "at_least_once"),
        (),
    ),
    "test_fifo_holds_within_each_priority": (("priority",), ()),
    "test_held_message_is_invisible_to_other_consumers": ((), ()),
    "test_higher_priority_messages_are_delivered_first": (("priority",), ()),
    "test_invalid_queue_names_raise_configuration_error": ((), ()),
    "test_lease_extension_capability_in_both_directions": ((), ()),
    "test_many_producers_and_consumers_lose_nothing_and_duplicate_nothing": ((), ()),
    "test_messages_of_one_priority_are_delivered_in_publish_order": ((), ()),
    "test_messages_published_by_a_process_sigkilled_right_after_publish_are_delivered": (
        ("durable",),
        (),
    ),
    "test_one_mebibyte_body_round_trips": ((), ()),
    "test_priority_capability_in_both_directions": ((), ()),
    "test_priority_is_preserved_on_the_envelope": (("priority",), ()),
    "test_priority_outside_zero_to_nine_is_refused": ((), ()),
    "test_publish_many_of_nothing_publishes_nothing": ((), ()),
    "test_publish_many_returns_the_count_and_keeps_order": ((), ()),
    "test_purge_leaves_held_messages_alone": ((), ()),
    "test_purge_removes_delayed_messages_too": (("delayed_delivery",), ()),
    "test_purge_returns_how_many_messages_it_removed": ((), ()),
    "test_queue_size_capability_in_both_directions": ((), ()),
    "test_receive_from_several_queues_returns_messages_of_each": ((), ()),
    "test_receive_never_returns_messages_that_are_not_yet_due": (("delayed_delivery",), ()),
    "test_receive_returns_at_most_max_messages": ((), ()),
    "test_receive_returns_ready_messages_without_waiting_for_max_messages": ((), ()),
    "test_receive_with_zero_timeout_polls_without_blocking": ((), ()),
    "test_receive_without_queues_raises_configuration_error": ((), ()),
    "test_rejected_message_lands_in_the_dead_letter_queue_with_same_id_and_body": (
        ("dead_letter",),
        (),
    ),
    "test_rejected_message_with_requeue_is_ready_again_as_redelivered": ((), ()),
    "test_rejected_message_without_requeue_is_not_delivered_again_on_its_queue": ((), ()),
    "test_rejecting_twice_is_a_no_op": ((), ()),
    "test_repr_never_shows_a_password": ((), ()),
    "test_size_counts_ready_messages_only": (("queue_size",), ()),
    "test_the_dead_letter_records_the_reject_reason_and_the_queue_it_came_from": (
        ("dead_letter",),
        (),
    ),
    "test_thousand_delayed_messages_stay_in_the_broker_until_due": (("delayed_delivery",), ()),
    "test_unacked_message_is_redelivered_after_consumer_closes": (("at_least_once",), ()),
    "test_unacked_message_is_redelivered_after_consumer_dies_without_closing": (
        ("at_least_once",),
        (),
    ),
    "test_unicode_and_nested_headers_round_trip": ((), ()),
    "test_unreachable_server_raises_operational_error_within_bounded_time": ((), ()),
}
#: Recorded from the single-module ResultBackendConformance before the split (issue 14).
RESULT_BACKEND_TESTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "test_a_failure_keeps_its_exception_document_and_traceback": ((), ()),
    "test_a_forgotten_success_can_be_stored_again": ((), ()),
    "test_a_group_expires_after_its_ttl": (("groups",), ()),
    "test_a_group_round_trips_in_member_order": (("groups",), ()),
    "test_a_later_store_sets_a_new_ttl": ((), ()),
    "test_a_record_expires_after_its_ttl": ((), ()),
    "test_a_record_stored_by_one_client_is_fetched_by_another": ((), ()),
    "test_a_record_stored_without_a_ttl_still_expires": ((), ()),
    "test_a_stored_non_success_state_is_replaced_by_a_later_store": ((), ("parametrize",)),
    "test_a_stored_success_is_never_replaced_by_a_redelivered_duplicate": ((), ("parametrize",)),
    "test_a_success_return_value_round_trips_as_json_equal_data": ((), ("parametrize",)),
    "test_a_waiter_is_woken_by_a_store_from_another_client": (("wait",), ()),
    "test_add_member_counts_a_member_delivered_twice_once": (("counters",), ()),
    "test_add_member_is_atomic_and_idempotent_under_threads": (("counters",), ()),
    "test_an_expired_record_is_never_returned_even_before_any_sweep": ((), ()),
    "test_any_client_may_read_a_result_any_number_of_times": (("multi_reader",), ()),
    "test_capabilities_are_a_frozenset_of_result_backend_capabilities": ((), ()),
    "test_children_group_and_parent_round_trip": ((), ()),
    "test_close_is_idempotent": ((), ()),
    "test_counters_and_sets_expire_with_their_ttl": (("counters",), ()),
    "test_counters_work_when_declared_and_are_refused_otherwise": ((), ()),
    "test_date_done_round_trips_as_aware_utc_within_a_millisecond": ((), ()),
    "test_every_operation_of_a_closed_backend_raises_connection_lost": ((), ()),
    "test_every_state_round_trips": ((), ("parametrize",)),
    "test_expired_records_are_deleted_natively_or_by_a_sweep": ((), ()),
    "test_extended_fields_round_trip": ((), ()),
    "test_fetch_group_of_an_unknown_id_returns_none": (("groups",), ()),
    "test_fetch_many_of_no_ids_returns_an_empty_mapping": ((), ()),
    "test_fetch_many_returns_five_hundred_records": ((), ()),
    "test_fetch_many_returns_present_ids_and_omits_missing_ones": ((), ()),
    "test_fetch_of_an_unknown_id_returns_none": ((), ()),
    "test_forget_deletes_the_record_and_is_idempotent": ((), ()),
    "test_forget_group_deletes_only_the_group_and_is_idempotent": (("groups",), ()),
    "test_groups_work_when_declared_and_are_refused_otherwise": ((), ()),
    "test_incr_adds_the_amount_and_a_missing_key_counts_as_zero": (("counters",), ()),
    "test_incr_and_add_member_refresh_the_ttl": (("counters",), ()),
    "test_incr_is_atomic_under_threads_and_across_clients": (("counters",), ()),
    "test_one_client_may_be_shared_by_threads": ((), ()),
    "test_purge_expired_deletes_only_expired_records_in_batches": (("expiry_sweep",), ()),
    "test_purge_expired_works_when_declared_and_is_refused_otherwise": ((), ()),
    "test_repr_never_shows_a_password": ((), ()),
    "test_the_backend_satisfies_the_protocols_it_declares": ((), ()),
    "test_the_default_ttl_is_finite": ((), ()),
    "test_wait_for_an_already_ready_record_returns_at_once": (("wait",), ()),
    "test_wait_for_an_unknown_id_returns_none_after_the_timeout": (("wait",), ()),
    "test_wait_for_polls_a_backend_without_push": ((), ()),
    "test_wait_for_returns_a_result_stored_later_by_another_client": ((), ()),
    "test_wait_returns_the_latest_non_ready_record_after_the_timeout": (("wait",), ()),
    "test_wait_wakes_within_250_ms_of_a_store_from_another_process": (
        ("wait", "cross_process"),
        (),
    ),
    "test_wait_wakes_within_250_ms_of_a_store_from_another_thread": (("wait",), ()),
    "test_wait_works_when_declared_and_is_refused_otherwise": ((), ()),
}


def _tests_of(cls: type) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{test name: (required capabilities, pytest mark names)}`` of a suite class."""
    found = {}
    for name in dir(cls):
        if name.startswith("test_"):
            fn = getattr(cls, name)
            required = tuple(str(c.value) for c in getattr(fn, REQUIRES_ATTR, ()))
            marks = tuple(m.name for m in getattr(fn, "pytestmark", ()))
            found[name] = (required, marks)
    return found


def test_the_suites_and_their_helpers_import_from_the_package() -> None:
    from conveyor.testing import (
        BrokerConformance,
        ResultBackendConformance,
        eventually,
        requires,
        service_unavailable,
        unique_name,
    )
    from conveyor.testing.broker import BrokerConformance as FromBroker
    from conveyor.testing.result_backend import ResultBackendConformance as FromResultBackend
    from conveyor.testing.support import eventually as support_eventually

    assert BrokerConformance is FromBroker
    assert ResultBackendConformance is FromResultBackend
    assert eventually is support_eventually
    assert callable(requires)
    assert callable(service_unavailable)
    assert unique_name("x").startswith("x-")
    for name in conveyor.testing.__all__:
        assert getattr(conveyor.testing, name) is not None


def test_the_documented_names_of_the_suite_packages_still_import() -> None:
    # docs/writing-an-implementation.md names these; conformance tests import them.
    from conveyor.testing import broker, result_backend

    for name in [*broker.__all__, "DEAD_LETTER_REASON_HEADER", "DEAD_LETTER_QUEUE_HEADER"]:
        assert hasattr(broker, name), name
    for name in [*result_backend.__all__, "skip_reason", "MakeResultBackend"]:
        assert hasattr(result_backend, name), name
    assert broker.DEAD_LETTER_REASON_HEADER == "x-conveyor-dead-letter-reason"
    assert broker.DEAD_LETTER_QUEUE_HEADER == "x-conveyor-dead-letter-queue"


@pytest.mark.parametrize(
    ("suite", "expected"),
    [("BrokerConformance", BROKER_TESTS), ("ResultBackendConformance", RESULT_BACKEND_TESTS)],
    ids=["broker", "result_backend"],
)
def test_the_composed_suite_has_exactly_the_tests_it_had_before_the_split(
    suite: str, expected: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
) -> None:
    cls: Any = getattr(conveyor.testing, suite)
    found = _tests_of(cls)
    assert sorted(set(expected) - set(found)) == [], "tests lost"
    assert sorted(set(found) - set(expected)) == [], "tests added: record them here"
    changed = {n: (expected[n], found[n]) for n in expected if found[n] != expected[n]}
    assert changed == {}, "required capabilities or marks changed (expected, found)"


@pytest.mark.parametrize("suite", ["BrokerConformance", "ResultBackendConformance"])
def test_no_mixin_of_a_suite_is_collected_on_its_own(suite: str) -> None:
    # pytest collects classes named Test*: a mixin so named would run without fixtures.
    cls: Any = getattr(conveyor.testing, suite)
    for base in cls.__mro__:
        assert not base.__name__.startswith("Test"), base
        assert "__test__" not in vars(base), base  # would be inherited by the adopters


def test_every_suite_module_stays_under_800_lines() -> None:
    package = Path(conveyor.testing.__file__).parent
    names = ["conveyor.testing"] + [
        m.name for m in pkgutil.walk_packages([str(package)], "conveyor.testing.")
    ]
    sizes = {}
    for name in names:
        path = importlib.util.find_spec(name).origin  # type: ignore[union-attr]
        sizes[name] = len(Path(path).read_text(encoding="utf-8").splitlines())
    assert "conveyor.testing.broker.leases" in sizes
    assert {n: s for n, s in sizes.items() if s >= 800} == {}

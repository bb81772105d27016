"""A claim retried after a lost reply loses nothing (Redis).

redis-py retries a command whose connection was reset (``Retry`` on ``ConnectionError``), with
the same arguments. When the reset came *after* the claim script ran, the retry runs it again
with the same lease-id prefix. The first run's envelopes are leased to a consumer that never
heard of them: they must come back when their leases lapse, not be overwritten by the second
run's leases (found by test_network_faults.py: a publish acknowledged, never consumed).
Here the retry is made deterministic by giving two claims the same prefix.
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from support.faults import REDIS_URL, target

from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name

pytestmark = pytest.mark.timeout(60)


def test_a_claim_run_twice_with_the_same_prefix_keeps_both_runs_envelopes(tmp_path: object) -> None:
    from conveyor.transports.redis import RedisBroker

    target("redis", tmp_path)  # type: ignore[arg-type]
    broker = RedisBroker.from_url(REDIS_URL, lease_seconds=0.5)
    queue = unique_name("retried-claim")
    try:
        sent = {str(uuid.uuid4()) for _ in range(6)}
        for envelope_id in sorted(sent):
            broker.publish(Envelope(id=envelope_id, body=b"{}"), queue=queue)
        broker._calls = itertools.repeat(7)  # type: ignore[attr-defined]  # every claim: one prefix
        first = broker.receive(queue, max_messages=3, timeout=1.0)  # "reply lost"
        second = broker.receive(queue, max_messages=3, timeout=1.0)  # the retry
        assert len(first) == len(second) == 3
        assert {d.receipt for d in first}.isdisjoint({d.receipt for d in second})
        broker._calls = itertools.count(100)  # type: ignore[attr-defined]
        seen: set[str] = set()

        def all_back() -> bool:
            for delivery in broker.receive(queue, max_messages=10, timeout=0.2):
                seen.add(delivery.envelope.id)
                broker.ack(delivery)
            return seen == sent

        eventually(all_back, 20, message="every envelope of both claims redelivered")
    finally:
        broker.purge(queue)
        broker.close()

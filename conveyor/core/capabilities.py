"""Capabilities: what an implementation promises beyond the required primitives.

Each implementation class declares its set once, in the class attribute ``capabilities``.
Anything not declared is *not* supported, so a capability added to this list later leaves
third-party implementations passing the conformance suite (their new tests skip, their
negative tests check the refusal).

Capabilities come in two kinds:

* **features** unlock an operation or argument (``delayed_delivery`` allows
  ``publish(delay=...)``; ``lease_extension`` allows ``extend()``). Using an undeclared feature
  raises :class:`~conveyor.core.errors.UnsupportedFeature`.
* **guarantees** describe semantics a caller may rely on (``durable``, ``cross_process``,
  ``multi_reader``, ``at_least_once``, ``native_ttl``, ``routes_by_reply_to``,
  ``compressed_results``). They have no
  method; the runtime reads them to warn (for example, a worker on a broker without
  ``at_least_once``), to skip work (no expiry sweep with ``native_ttl``) or to wire the
  implementation (``routes_by_reply_to``, ``compressed_results``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["BROKER_CAPABILITIES", "RESULT_BACKEND_CAPABILITIES", "Capability", "capability_set"]


class Capability(str, enum.Enum):
    """Every capability conveyor knows. Values are the names used in docs and skips."""

    # ---- broker features
    DELAYED_DELIVERY = "delayed_delivery"
    """``publish(..., delay=seconds)`` holds the message in the broker until due."""
    PRIORITY = "priority"
    """Envelopes with priority 1-9 are delivered before lower priorities (FIFO within one)."""
    DEAD_LETTER = "dead_letter"
    """``reject(requeue=False)`` moves the message to ``dead_letter_queue(queue)``."""
    LEASE_EXTENSION = "lease_extension"
    """``extend(delivery, seconds)`` renews the lease on a held message."""
    QUEUE_SIZE = "queue_size"
    """``size(queue)`` counts ready (not held, not delayed) messages."""
    # ---- broker guarantees
    AT_LEAST_ONCE = "at_least_once"
    """A delivery not acked by a consumer that dies is delivered again."""

    # ---- result backend features
    EXPIRY_SWEEP = "expiry_sweep"
    """``purge_expired()`` deletes expired results in bounded batches."""
    WAIT = "wait"
    """``wait(task_id, timeout)`` is woken by the store (push), not by polling."""
    COUNTERS = "counters"
    """``incr()`` and ``add_member()`` are atomic across processes (chord joins)."""
    GROUPS = "groups"
    """``store_group()``, ``fetch_group()``, ``forget_group()``."""
    # ---- result backend guarantees
    NATIVE_TTL = "native_ttl"
    """The store itself expires results; no sweeper is needed."""
    MULTI_READER = "multi_reader"
    """Any client may fetch any result, any number of times (rpc:// cannot)."""
    ROUTES_BY_REPLY_TO = "routes_by_reply_to"
    """A result is a message to its sender's reply queue (rpc://): the worker puts the task's
    ``reply_to`` and ``correlation_id`` into ``ResultRecord.extended``, and the app builds
    the backend with ``broker_url=``, ``reply_to=`` and ``default_ttl=`` and declares the
    reply queue before its first send that wants a result."""
    COMPRESSED_RESULTS = "compressed_results"
    """Reads Celery 5.7 compressed result payloads (``result_compression``), bounded like a
    worker's decode: the app builds the backend with ``accept_compression=`` (its setting),
    the compression methods such a payload may use."""

    # ---- shared guarantees
    DURABLE = "durable"
    """Data survives a restart of the client process (and of the server where it persists)
    and is never evicted before its expiry (memcached may evict)."""
    CROSS_PROCESS = "cross_process"
    """Other processes (and machines) see the same queues or results (memory:// does not)."""

    def __str__(self) -> str:
        return self.value


BROKER_CAPABILITIES = frozenset(
    {
        Capability.DELAYED_DELIVERY,
        Capability.PRIORITY,
        Capability.DEAD_LETTER,
        Capability.LEASE_EXTENSION,
        Capability.QUEUE_SIZE,
        Capability.AT_LEAST_ONCE,
        Capability.DURABLE,
        Capability.CROSS_PROCESS,
    }
)
RESULT_BACKEND_CAPABILITIES = frozenset(
    {
        Capability.NATIVE_TTL,
        Capability.EXPIRY_SWEEP,
        Capability.WAIT,
        Capability.COUNTERS,
        Capability.GROUPS,
        Capability.MULTI_READER,
        Capability.ROUTES_BY_REPLY_TO,
        Capability.COMPRESSED_RESULTS,
        Capability.DURABLE,
        Capability.CROSS_PROCESS,
    }
)


def capability_set(values: Iterable[Capability | str]) -> frozenset[Capability]:
    """Normalise names or members into a frozenset; unknown names raise ``ValueError``."""
    return frozenset(Capability(v) for v in values)

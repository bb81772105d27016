"""The Redis broker (:class:`RedisBroker`): publish, claim under leases, settle, extend and
admin, on the keys of :mod:`.keys` with the envelopes of :mod:`.envelope`. Capabilities, URL,
options, thread-safety and how a receive works: :mod:`conveyor.transports.redis`."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, ClassVar, NoReturn, TypeVar

import redis

from conveyor._drivers.redis import HeldConnections, connect, parse_redis_url, translating
from conveyor.core.base import BrokerBase, HeldLeases, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    InvalidReceipt,
    OperationalError,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    EXACT_MS_MAX_DELAY,
    check_delay,
    clean_reason,
    undecodable_reason,
)
from conveyor.transports.redis.envelope import (
    KOMBU_MAX_PRIORITY,
    decode_envelope,
    encode_envelope,
    undecodable_stand_in,
)
from conveyor.transports.redis.keys import Keys, Scripts
from conveyor.transports.redis.options import RedisBrokerOptions

__all__ = ["RedisBroker"]

log = logging.getLogger("conveyor.transports.redis")

_MAX_MESSAGES = 1000
_PUBLISH_CHUNK = 1000
_SETTLED_MEMORY = 10_000
_WAKE_TTL_MS = 60_000
_WAKE_TTL_TEXT = str(_WAKE_TTL_MS)
_DELAY_WHY = "due times are sorted-set scores in milliseconds, exact below 2**53"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``Delivery.receipt`` holds: the queue and the lease id (``<owner>:<call>:<n>``)."""

    queue: str
    lease: str


class RedisBroker(BrokerBase):
    """Broker on Redis in kombu's layout; see the module docstring.

    Args:
        client: a ready redis-py client (``decode_responses=False``). Not closed by
            :meth:`close` unless the broker built it (``from_url``).
        options: :class:`RedisBrokerOptions`; defaults when None.
        url: the URL shown (masked) in ``repr`` and errors.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.LEASE_EXTENSION,
            Capability.DELAYED_DELIVERY,
            Capability.PRIORITY,
            Capability.DEAD_LETTER,
            Capability.QUEUE_SIZE,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        client: redis.Redis,
        options: RedisBrokerOptions | None = None,
        *,
        url: str = "redis://",
        _owns_client: bool = False,
    ) -> None:
        self.options = options or RedisBrokerOptions()
        self.url = url
        self._client = client
        self._owns_client = _owns_client
        self._scripts = Scripts(client)
        # publish, claim, ack, settle and extend: raw commands on a connection per thread.
        self._cmd = HeldConnections(client)
        opts = self.options
        self._keys = Keys(opts.global_keyprefix, opts.sep, opts.priority_steps)
        self._steps_argv = [str(s) for s in opts.priority_steps]
        self._ready_cache: dict[str, list[str]] = {}
        self._token = uuid.uuid4().hex[:12]
        self._calls = itertools.count(1)
        self._rotation = itertools.count()
        self._lock = threading.Lock()  # close() runs once
        # Held leases ((queue, lease id) -> lease id) and the receipts settled lately.
        self._leases = HeldLeases(_SETTLED_MEMORY)
        self._closed = False
        # A blocking BLPOP must return before the socket timeout fires.
        timeout = opts.socket_timeout
        self._max_block = max(0.001, timeout / 2) if timeout else 1.0
        # A consumer that claimed or extended within this window counts as consuming a queue.
        self._live_window_ms = math.ceil(max(10.0, 2 * opts.lease_seconds) * 1000)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        """Build a broker (and its own client, closed by ``close``) from ``url``.

        Does not connect: the first operation does.

        Raises:
            InvalidURL: malformed URL.
            ConfigurationError: unknown or bad option, Sentinel without ``master_name``,
                TLS keys on a plain URL.
        """
        target, query = parse_redis_url(url)
        opts = build_options(RedisBrokerOptions, query, options, owner="redis broker")
        client = connect(target, opts, url)
        return cls(client, opts, url=url, _owns_client=True)

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (shared by every call of this broker)."""
        return self._client

    # ------------------------------------------------------------------ plumbing
    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        with translating(what, self.url):
            return fn(*args)

    def _bucket(self, priority: int) -> int:
        """1-based position of the ready list for conveyor priority ``priority``."""
        kombu_priority = KOMBU_MAX_PRIORITY - priority
        pos = 1
        for i, step in enumerate(self.options.priority_steps, start=1):
            if step <= kombu_priority:
                pos = i
        return pos

    def _settle_keys(self, queue: str) -> list[str]:
        dead = queue + DEAD_LETTER_SUFFIX
        k = self._keys
        return [
            k.own(queue, "leases"),
            k.own(queue, "deadlines"),
            k.own(queue, "wake"),
            k.own(dead, "wake"),
            *k.ready(queue),
            *k.ready(dead),
        ]

    # ------------------------------------------------------------------ queues
    def declare_queue(self, name: str) -> None:
        """Write kombu's binding for ``name`` (``SADD``; idempotent). One round trip."""
        validate_queue_name(name)
        key, member = self._keys.binding(name)
        self._run("declare queue", lambda: self._client.sadd(key, member))

    # ------------------------------------------------------------------ publish
    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """LPUSH the envelope (or add it to the delayed set). One round trip, atomic.

        Raises:
            UnsupportedFeature, ConfigurationError: see the protocol.
            OperationalError: not accepted (a retried command may, rarely, have been
                accepted twice: at-least-once).
        """
        self.publish_many([envelope], queue=queue, delay=delay)

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Publish to one queue in one script call per 1000 envelopes (one round trip each).

        Returns:
            How many were published. On error, the chunks before the failing one were.
        """
        validate_queue_name(queue)
        self._check_open()
        batch = list(envelopes)
        for envelope in batch:
            self._check_publish(envelope, delay)
        if not batch:
            return 0
        if not delay:
            return self._push(batch, queue)
        check_delay(delay, EXACT_MS_MAX_DELAY, "the Redis broker", _DELAY_WHY)
        delay_ms = math.ceil(delay * 1000) + 1
        k = self._keys
        keys = [k.own(queue, "delayed"), k.own(queue, "wake"), k.own(queue, "consumers")]
        keys += k.ready(queue)
        head = [
            str(delay_ms),
            str(_WAKE_TTL_MS),
            str(self._live_window_ms),
            str(len(self._steps_argv)),
            *self._steps_argv,
        ]
        done = 0
        for start in range(0, len(batch), _PUBLISH_CHUNK):
            args: list[Any] = list(head)
            for envelope in batch[start : start + _PUBLISH_CHUNK]:
                kp = KOMBU_MAX_PRIORITY - envelope.priority
                args.append(str(self._bucket(envelope.priority)))
                args.append("1" if envelope.headers.get("eta") else "0")
                args.append(encode_envelope(envelope, queue, kp))
            done += self._publish_chunk(keys, args)
        return done

    def _publish_chunk(self, keys: list[str], args: list[Any]) -> int:
        return int(self._run("publish", self._cmd.run_script, self._scripts.publish, keys, args))

    def _push(self, batch: list[Envelope], queue: str) -> int:
        """Ready-now publish (push.lua): only the ready lists that receive a message."""
        ready = self._ready_keys(queue)
        done = 0
        for start in range(0, len(batch), _PUBLISH_CHUNK):
            keys = [self._keys.own(queue, "wake")]
            slots: dict[int, str] = {}  # bucket -> its KEYS index, as text
            args: list[Any] = [_WAKE_TTL_TEXT]
            for envelope in batch[start : start + _PUBLISH_CHUNK]:
                bucket = self._bucket(envelope.priority)
                slot = slots.get(bucket)
                if slot is None:
                    keys.append(ready[bucket - 1])
                    slot = slots[bucket] = str(len(keys))
                args.append(slot)
                args.append(
                    encode_envelope(envelope, queue, KOMBU_MAX_PRIORITY - envelope.priority)
                )
            done += int(self._run("publish", self._cmd.run_script, self._scripts.push, keys, args))
        return done

    def _ready_keys(self, queue: str) -> list[str]:
        """``_keys.ready(queue)``, remembered for the most recent queues."""
        keys = self._ready_cache.get(queue)
        if keys is None:
            if len(self._ready_cache) >= 256:
                self._ready_cache.clear()
            keys = self._ready_cache[queue] = self._keys.ready(queue)
        return keys

    # ------------------------------------------------------------------ receive
    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Claim up to ``max_messages`` envelopes, each under a lease of ``lease_seconds``.

        Blocks at most ``timeout`` seconds (plus the socket timeout on a hung server) when
        nothing is ready; ``timeout=0`` claims once. See the module docstring for how.

        Raises:
            ConfigurationError: no queue, a bad name, ``max_messages`` < 1.
            OperationalError: the server could not be reached.
        """
        names = self._check_receive(queues, max_messages, timeout)
        self._check_open()
        if len(names) > 1:
            shift = next(self._rotation) % len(names)
            names = names[shift:] + names[:shift]
        limit = min(max_messages, _MAX_MESSAGES)
        deadline = monotonic() + max(0.0, timeout)
        wake_keys = [self._keys.own(q, "wake") for q in names]
        while True:
            hint, deliveries = self._claim(names, limit)
            if deliveries:
                return deliveries
            remaining = deadline - monotonic()
            if remaining <= 0:
                return []
            wait = min(remaining, self.options.poll_interval, self._max_block)
            if hint >= 0:
                wait = min(wait, hint / 1000.0 + 0.001)
            if wait >= 0.001:
                self._block(wake_keys, wait)

    def _block(self, wake_keys: list[str], seconds: float) -> None:
        """BLPOP one wake token (any queue) or time out after ``seconds``."""
        self._run("wait for messages", self._cmd.call, "BLPOP", *wake_keys, round(seconds, 3))

    def _claim(self, names: list[str], limit: int) -> tuple[int, list[Delivery]]:
        keys: list[str] = []
        k = self._keys
        for queue in names:
            keys += [
                k.own(queue, "leases"),
                k.own(queue, "deadlines"),
                k.own(queue, "delayed"),
                k.own(queue, "wake"),
                k.own(queue, "consumers"),
                *k.ready(queue),
            ]
        opts = self.options
        prefix = f"{self._token}:{next(self._calls)}"
        args = [
            str(limit),
            str(max(1, math.ceil(opts.lease_seconds * 1000))),
            prefix,
            str(len(names)),
            str(opts.reclaim_batch),
            str(opts.promote_batch),
            str(_WAKE_TTL_MS),
            self._token,
            str(self._live_window_ms),
            *self._steps_argv,
        ]
        reply = self._run("receive", self._cmd.run_script, self._scripts.claim, keys, args)
        hint = int(reply[0])
        deliveries: list[Delivery] = []
        poison: list[tuple[str, str, Any, str]] = []
        for i in range(1, len(reply), 3):
            queue = names[int(reply[i])]
            lease = reply[i + 1].decode() if isinstance(reply[i + 1], bytes) else str(reply[i + 1])
            try:
                envelope, redelivered, count = decode_envelope(reply[i + 2])
            except DecodeError as exc:
                reason = undecodable_reason(exc)
                log.error("dead-lettering a message from %r: %s", queue, reason)
                poison.append((queue, lease, reply[i + 2], reason))
                continue
            deliveries.append(
                Delivery(
                    envelope=envelope,
                    queue=queue,
                    receipt=_Receipt(queue, lease),
                    redelivered=redelivered,
                    delivery_count=count,
                )
            )
        self._leases.hold(((d.queue, d.receipt.lease), d.receipt.lease) for d in deliveries)
        for queue, lease, raw, reason in poison:
            self._dead_letter_undecodable(queue, lease, raw, reason)
        return hint, deliveries

    def _dead_letter_undecodable(self, queue: str, lease: str, raw: Any, reason: str) -> None:
        """Replace a claimed undecodable envelope by its stand-in in ``<queue>.dead``.

        Never raises: if the server fails now, the lease runs out and the next claim that
        gets the message dead-letters it then (the good messages of this claim are kept)."""
        try:
            text = undecodable_stand_in(raw, queue, reason)
            args = ["replace", text, str(_WAKE_TTL_MS), str(len(self._steps_argv))]
            args += [*self._steps_argv, lease]
            self._run(
                "dead-letter", self._cmd.run_script, self._scripts.settle,
                self._settle_keys(queue), args,
            )  # fmt: skip
        except Exception as exc:
            log.warning(
                "could not dead-letter an undecodable message from %r (it comes back when its "
                "lease runs out): %s", queue, exc,
            )  # fmt: skip

    # ------------------------------------------------------------------ settle
    def _receipt(self, delivery: Delivery) -> _Receipt:
        receipt = delivery.receipt
        if not isinstance(receipt, _Receipt):
            raise InvalidReceipt(f"not a delivery of a Redis broker: {delivery!r}")
        return receipt

    def _was_settled(self, receipt: _Receipt) -> bool:
        return self._leases.was_settled((receipt.queue, receipt.lease), receipt.lease)

    def _mark_settled(self, receipt: _Receipt) -> None:
        self._leases.settle((receipt.queue, receipt.lease), receipt.lease)

    def _lost(self, receipt: _Receipt, what: str) -> NoReturn:
        raise InvalidReceipt(
            f"cannot {what} {receipt.lease} on {receipt.queue!r}: its lease was lost (it "
            "expired and the message was, or will be, delivered again)"
        )

    def ack(self, delivery: Delivery) -> None:
        """Delete the lease: the message is gone. Idempotent. One round trip (MULTI/EXEC).

        Raises:
            InvalidReceipt: the lease was lost (expired and reclaimed).
            ConnectionLost: the broker is closed or the server unreachable.
        """
        receipt = self._receipt(delivery)
        self._check_open()
        if self._was_settled(receipt):
            return
        k = self._keys

        commands = [
            ("HDEL", k.own(receipt.queue, "leases"), receipt.lease),
            ("ZREM", k.own(receipt.queue, "deadlines"), receipt.lease),
        ]
        removed, _ = self._run("ack", lambda: self._cmd.pipeline(commands, transaction=True))
        self._mark_settled(receipt)
        if not removed:
            self._lost(receipt, "ack")

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Requeue (back of its priority list, marked redelivered) or dead-letter. Idempotent.

        Raises:
            InvalidReceipt: the lease was lost.
            ConnectionLost: closed or unreachable.
        """
        receipt = self._receipt(delivery)
        self._check_open()
        if self._was_settled(receipt):
            return
        settled = self._settle(
            receipt.queue, [receipt.lease], "requeue" if requeue else "dead", reason
        )
        self._mark_settled(receipt)
        if not settled:
            self._lost(receipt, "reject")

    def _settle(self, queue: str, leases: list[str], mode: str, reason: str = "") -> int:
        fragment = ""
        if mode == "dead":
            fragment = (
                f"{json.dumps(DEAD_LETTER_REASON_HEADER)}: {json.dumps(clean_reason(reason))}, "
                f"{json.dumps(DEAD_LETTER_SOURCE_HEADER)}: {json.dumps(queue)}"
            )
        args = [mode, fragment, str(_WAKE_TTL_MS), str(len(self._steps_argv)), *self._steps_argv]
        args += leases
        keys = self._settle_keys(queue)
        return int(
            self._run(f"settle ({mode})", self._cmd.run_script, self._scripts.settle, keys, args)
        )

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Move the lease's deadline to ``seconds`` from now (server clock). One round trip.

        Raises:
            InvalidReceipt: the delivery is no longer held (settled, or its lease lost).
        """
        receipt = self._receipt(delivery)
        self._check_open()
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"seconds must be a positive number: {seconds!r}")
        if self._was_settled(receipt):
            raise InvalidReceipt(f"{receipt.lease} on {receipt.queue!r} was already settled")
        k = self._keys
        q = receipt.queue
        keys = [k.own(q, "leases"), k.own(q, "deadlines"), k.own(q, "consumers")]
        ms = str(max(1, math.ceil(seconds * 1000)))
        args = [receipt.lease, ms, self._token, str(self._live_window_ms)]
        if not int(self._run("extend", self._cmd.run_script, self._scripts.extend, keys, args)):
            self._lost(receipt, "extend")

    # ------------------------------------------------------------------ admin
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue`` (held ones stay). Atomic."""
        validate_queue_name(queue)
        keys = [self._keys.own(queue, "delayed"), *self._keys.ready(queue)]
        return int(self._run("purge", self._cmd.run_script, self._scripts.purge, keys, []))

    def size(self, queue: str) -> int:
        """Ready messages of ``queue`` (``LLEN`` of its lists, one round trip)."""
        validate_queue_name(queue)

        def work() -> int:
            pipe = self._client.pipeline(transaction=False)
            for key in self._keys.ready(queue):
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

        return self._run("size", work)

    def close(self) -> None:
        """Give every held message back (front of its queue, redelivered), then disconnect.

        Idempotent. If the server is unreachable the held messages come back when their
        leases expire.
        """
        with self._lock:
            if self._closed:
                return
            held = self._leases.take_all()
        by_queue: dict[str, list[str]] = {}
        for (queue, _), lease in held.items():
            by_queue.setdefault(queue, []).append(lease)
        try:
            for queue, leases in by_queue.items():
                self._settle(queue, leases, "release")
        except OperationalError as exc:
            log.warning("could not release %d held messages on close: %s", len(held), exc)
        finally:
            self._closed = True
            self._cmd.close()
            if self._owns_client:
                with contextlib.suppress(Exception):
                    self._client.close()
                with contextlib.suppress(Exception):
                    self._client.connection_pool.disconnect()

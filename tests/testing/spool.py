"""A file-system spool broker, written the way a third party would write one.

It lives in ``tests/`` only: it proves that an implementation outside conveyor can adopt
:class:`~conveyor.testing.broker.BrokerConformance` with one fixture, that the suite's skips
name the capabilities such a broker lacks, and that its negative tests check the refusals.

Capabilities:
    ``at_least_once``, ``queue_size``, ``cross_process`` (any process that sees the directory
    shares the queues), ``durable`` (messages are files, fsynced on publish by default). Not
    ``delayed_delivery``, ``priority``, ``dead_letter`` or ``lease_extension``.

URL:
    ``spool:///absolute/directory[?option=value...]``. A host is refused (``spool://dir`` is
    ambiguous); the directory is created if missing.

Options:
    ``lease_seconds`` (float, 60.0): how long a received message stays held before another
    consumer may take it. ``poll_interval`` (float, 0.02): seconds between directory scans
    while ``receive`` waits (there is no change notification). ``fsync`` (bool, true): fsync
    each message file before it becomes visible.

Thread-safety:
    An instance may be shared by threads; state it keeps (the held receipts) is under a lock,
    and every hand-over between processes is one atomic ``rename``.

Layout: ``<root>/<encoded queue>/{tmp,ready,held}/``. A ready file is named
``<order>.<deliveries>.msg`` where ``<order>`` (wall-clock nanoseconds, pid, sequence) sorts in
publish order; claiming renames it to ``held/<order>.<deliveries+1>.<deadline_ns>.<token>.msg``;
a consumer that finds a held file past its deadline renames it back to ``ready/``. Whoever's
``rename``/``unlink`` comes first wins, so an ``ack`` racing a reclaim either removes the
message or raises ``InvalidReceipt``, never both.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

from conveyor.core.base import BrokerBase, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    InvalidReceipt,
    InvalidURL,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import parse_url

__all__ = ["SpoolBroker", "SpoolBrokerOptions"]

_SUFFIX = ".msg"


@dataclass(frozen=True)
class SpoolBrokerOptions:
    lease_seconds: float = 60.0
    poll_interval: float = 0.02
    fsync: bool = True

    def __post_init__(self) -> None:
        if not self.lease_seconds > 0:
            raise ConfigurationError(f"lease_seconds must be > 0, got {self.lease_seconds!r}")
        if not self.poll_interval > 0:
            raise ConfigurationError(f"poll_interval must be > 0, got {self.poll_interval!r}")


@dataclass(eq=False)
class _Receipt:
    broker: SpoolBroker
    queue_dir: str
    held_name: str
    ready_name: str
    state: str = "held"  # then "settled" or "lost"; settling twice is a no-op


def _encode(envelope: Envelope) -> bytes:
    return json.dumps(
        {
            "id": envelope.id,
            "body": base64.b64encode(envelope.body).decode("ascii"),
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "headers": dict(envelope.headers),
            "priority": envelope.priority,
            "correlation_id": envelope.correlation_id,
            "reply_to": envelope.reply_to,
        },
        ensure_ascii=False,
    ).encode("utf-8")


def _decode(data: bytes) -> Envelope:
    doc = json.loads(data)
    doc["body"] = base64.b64decode(doc["body"])
    return Envelope(**doc)


def _dir_name(queue: str) -> str:
    # quote() leaves only [A-Za-z0-9_.~-] and %XX; encoding '.' too rules out '.' and '..'.
    encoded = quote(queue, safe="").replace(".", "%2E")
    if len(encoded) > 200:  # file names are limited to 255 bytes
        # '%h' cannot come out of quote() ('h' is not a hex digit), so no collision.
        encoded = "%h" + hashlib.sha256(queue.encode("utf-8")).hexdigest()
    return encoded


class SpoolBroker(BrokerBase):
    """Queues as directories of files. See the module docstring."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.QUEUE_SIZE,
            Capability.CROSS_PROCESS,
            Capability.DURABLE,
        }
    )

    def __init__(self, root: str, options: SpoolBrokerOptions, *, url: str = "") -> None:
        self.root = root
        self.options = options
        self.url = url or f"spool://{root}"
        self._lock = threading.Lock()
        self._held: dict[str, _Receipt] = {}
        self._known: set[str] = set()
        self._seq = itertools.count()
        self._closed = False
        with self._translate():
            os.makedirs(root, exist_ok=True)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SpoolBroker:
        parsed = parse_url(url)
        if parsed.hosts:
            raise InvalidURL(f"{parsed.masked()!r}: use spool:///absolute/path (no host)")
        if not parsed.path.strip("/"):
            raise InvalidURL(f"{parsed.masked()!r} names no directory")
        opts = build_options(SpoolBrokerOptions, parsed.query, options, owner="spool broker")
        return cls("/" + parsed.path, opts, url=url)

    # ---- the one place where file-system errors become conveyor errors
    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise ConnectionLost(f"spool at {self.root!r} failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    def _queue_dir(self, queue: str) -> str:
        path = os.path.join(self.root, _dir_name(validate_queue_name(queue)))
        if path not in self._known:
            for sub in ("tmp", "ready", "held"):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
            self._known.add(path)
        return path

    # ---- primitives
    def declare_queue(self, name: str) -> None:
        self._check_open()
        with self._translate():
            self._queue_dir(name)

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        self._check_open()
        self._check_publish(envelope, delay)
        with self._translate():
            path = self._queue_dir(queue)
            order = f"{time.time_ns():020d}-{os.getpid():07d}-{next(self._seq):09d}"
            name = f"{order}.0{_SUFFIX}"
            tmp = os.path.join(path, "tmp", name)
            with open(tmp, "wb") as handle:
                handle.write(_encode(envelope))
                if self.options.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.rename(tmp, os.path.join(path, "ready", name))

    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        names = self._queue_list(queues)
        if max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages!r}")
        deadline = time.monotonic() + timeout
        while True:
            self._check_open()
            with self._translate():
                out: list[Delivery] = []
                for queue in names:
                    path = self._queue_dir(queue)
                    self._reclaim(path)
                    out += self._claim(queue, path, max_messages - len(out))
                    if len(out) >= max_messages:
                        break
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(self.options.poll_interval, remaining))

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, None)

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        self._settle(delivery, "ready" if requeue else None)

    def purge(self, queue: str) -> int:
        self._check_open()
        with self._translate():
            path = self._queue_dir(queue)
            self._reclaim(path)
            count = 0
            for name in os.listdir(os.path.join(path, "ready")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, "ready", name))
                    count += 1
            return count

    def size(self, queue: str) -> int:
        self._check_open()
        with self._translate():
            path = self._queue_dir(queue)
            self._reclaim(path)
            return len(os.listdir(os.path.join(path, "ready")))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held, self._held = list(self._held.values()), {}
        with self._translate():
            for receipt in held:
                self._move_back(receipt)

    # ---- internals
    def _claim(self, queue: str, path: str, limit: int) -> list[Delivery]:
        ready_dir = os.path.join(path, "ready")
        out: list[Delivery] = []
        for name in sorted(os.listdir(ready_dir)):
            if len(out) >= limit:
                break
            order, count, _ = name.split(".")
            deliveries = int(count) + 1
            deadline = time.time_ns() + int(self.options.lease_seconds * 1e9)
            held_name = f"{order}.{deliveries}.{deadline}.{uuid.uuid4().hex[:12]}{_SUFFIX}"
            held_path = os.path.join(path, "held", held_name)
            try:
                os.rename(os.path.join(ready_dir, name), held_path)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            with open(held_path, "rb") as handle:
                envelope = _decode(handle.read())
            receipt = _Receipt(self, path, held_name, f"{order}.{deliveries}{_SUFFIX}")
            with self._lock:
                self._held[held_name] = receipt
            out.append(Delivery(envelope, queue, receipt, deliveries > 1, deliveries))
        return out

    def _reclaim(self, path: str) -> None:
        """Put held messages whose lease ran out back into ready/ (any consumer may)."""
        now = time.time_ns()
        for name in os.listdir(os.path.join(path, "held")):
            order, count, deadline, _token, _ = name.split(".")
            if int(deadline) <= now:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        os.path.join(path, "held", name),
                        os.path.join(path, "ready", f"{order}.{count}{_SUFFIX}"),
                    )

    def _settle(self, delivery: Delivery, to: str | None) -> None:
        self._check_open()
        receipt = delivery.receipt
        if not isinstance(receipt, _Receipt) or receipt.broker.root != self.root:
            raise InvalidReceipt(f"{delivery.envelope.id!r} was not received from this spool")
        with self._lock:
            if receipt.state == "settled":
                return
            if receipt.state == "held":
                receipt.broker._held.pop(receipt.held_name, None)
                held_path = os.path.join(receipt.queue_dir, "held", receipt.held_name)
                with self._translate():
                    try:
                        if to is None:
                            os.unlink(held_path)
                        else:
                            target = os.path.join(receipt.queue_dir, to, receipt.ready_name)
                            os.rename(held_path, target)
                        receipt.state = "settled"
                        return
                    except FileNotFoundError:
                        receipt.state = "lost"
        raise InvalidReceipt(
            f"lease on {delivery.envelope.id!r} was lost (another consumer reclaimed it)"
        )

    def _move_back(self, receipt: _Receipt) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(
                os.path.join(receipt.queue_dir, "held", receipt.held_name),
                os.path.join(receipt.queue_dir, "ready", receipt.ready_name),
            )

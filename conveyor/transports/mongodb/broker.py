"""The MongoDB broker (see :mod:`conveyor.transports.mongodb` for URL, options and
semantics)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient, ReturnDocument
from pymongo import errors as mongo_errors
from pymongo.collection import Collection

from conveyor._drivers.mongodb import DRIVER_ERRORS, connect, split_mongodb_url, translate_error
from conveyor.core.base import BrokerBase, HeldLeases, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConnectionLost,
    InvalidReceipt,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import mask_text, mask_url
from conveyor.transports._common import (
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
    clean_reason,
    clean_text,
    undecodable_reason,
)
from conveyor.transports.mongodb.documents import (
    _DELAYED,
    _EPOCH,
    _NEXT_COUNT,
    _READY,
    _ceil_ms,
    _check_seconds,
    _guard,
    _id_key,
    _id_value,
    _now,
    _Receipt,
    decode_document,
    encode_document,
)
from conveyor.transports.mongodb.options import OPTION_NAMES, MongoDBBrokerOptions

__all__ = ["MongoDBBroker"]

log = logging.getLogger("conveyor.transports.mongodb")

_INSERT_BATCH = 1000
_RELEASE_BATCH = 500
_SETTLED_MEMORY = 10_000  # receipts remembered so a second ack/reject is a no-op
_MAX_MESSAGES = 1000
_BATCH_ATTEMPTS = 3  # batch claims that lost every candidate to other consumers, in a row
_CLAIM_ORDER = [("priority", DESCENDING), ("_id", ASCENDING)]
_CLAIM_INDEX = "conveyor_claim"
_DUE_INDEX = "conveyor_due"


class MongoDBBroker(BrokerBase):
    """Broker on a MongoDB collection; see the module docstring for URL, options and
    semantics.

    Args:
        client: a ready :class:`pymongo.MongoClient` (not closed by ``close`` unless this
            broker built it in :meth:`from_url`).
        options: :class:`MongoDBBrokerOptions`; defaults when None.
        url: the URL shown (masked) in ``repr`` and error messages.
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
        client: MongoClient[dict[str, Any]],
        options: MongoDBBrokerOptions | None = None,
        *,
        url: str | None = None,
        _owns_client: bool = False,
    ) -> None:
        self.options = options or MongoDBBrokerOptions()
        self._client = client
        self._owns_client = _owns_client
        self.url = url or "mongodb://"
        name = self.options.database or client.get_default_database("conveyor").name
        collection = client[name][self.options.collection]
        # Text that is not UTF-8 (a server that does not check what others wrote) must make
        # one message undecodable, not every claim raise while reading the claimed document.
        codec = collection.codec_options.with_options(unicode_decode_error_handler="replace")
        self._collection: Collection[dict[str, Any]] = collection.with_options(codec_options=codec)
        self._instance = secrets.token_hex(8)
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self._leases = HeldLeases(_SETTLED_MEMORY)
        self._promote_at: dict[str, float] = {}
        self._indexes_ready = not self.options.create_indexes
        self._closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoDBBroker:
        """Build a broker, with its own long-lived client (closed by ``close``), from ``url``.

        Does not wait for the server: the first operation does (and creates the indexes).

        Raises:
            InvalidURL: not a MongoDB URL, or pymongo rejects the URI.
            ConfigurationError: unknown option or bad value (conveyor's or the driver's).
        """
        driver_url, query = split_mongodb_url(url, OPTION_NAMES)
        opts = build_options(MongoDBBrokerOptions, query, options, owner="mongodb broker")
        client = connect(
            driver_url,
            url,
            connect_timeout=opts.connect_timeout,
            server_selection_timeout=opts.server_selection_timeout,
            operation_timeout=opts.operation_timeout,
        )
        try:
            return cls(client, opts, url=url, _owns_client=True)
        except BaseException:
            client.close()
            raise

    @property
    def client(self) -> MongoClient[dict[str, Any]]:
        """The PyMongo client."""
        return self._client

    @property
    def collection(self) -> Collection[dict[str, Any]]:
        """The message collection."""
        return self._collection

    # ------------------------------------------------------------------ driver boundary
    @contextlib.contextmanager
    def _driver(self, what: str) -> Iterator[None]:
        """Every driver call runs in here: closed check and error translation."""
        self._check_open()
        try:
            yield
        except DRIVER_ERRORS as exc:
            if self._closed:
                raise ConnectionLost(f"{self!r} is closed") from exc
            raise translate_error(exc, what=what, url=self.url) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    def create_indexes(self) -> None:
        """Create the claim and due-time indexes if missing. Idempotent; safe when several
        processes race (MongoDB treats an identical index definition as a no-op)."""
        models = [
            IndexModel(
                [
                    ("queue", ASCENDING),
                    ("state", ASCENDING),
                    ("priority", DESCENDING),
                    ("_id", ASCENDING),
                ],
                name=_CLAIM_INDEX,
            ),
            IndexModel(
                [("queue", ASCENDING), ("state", ASCENDING), ("due", ASCENDING)],
                name=_DUE_INDEX,
            ),
        ]
        with self._driver("create indexes"):
            try:
                self._collection.create_indexes(models)
            except mongo_errors.OperationFailure as exc:
                if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                    raise
                # Someone created equivalent indexes under other names: use them.
                log.warning("%s: keeping existing indexes: %s", self._collection.full_name, exc)
        self._indexes_ready = True

    def _ensure_indexes(self) -> None:
        if not self._indexes_ready:
            self.create_indexes()

    # ------------------------------------------------------------------ publish
    def declare_queue(self, name: str) -> None:
        """Queues need no declaration; this validates the name and creates the indexes."""
        self._check_open()
        validate_queue_name(name)
        self._ensure_indexes()

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Insert one message (acknowledged by the server with the URL's write concern).

        Raises:
            UnsupportedFeature: never (priority and delay are supported).
            ConfigurationError: bad queue name, priority outside 0-9, negative delay.
            EncodeError: headers not JSON-representable, or the message exceeds 16 MiB.
            OperationalError: the server could not be reached; the message was not accepted.
        """
        self._check_open()
        validate_queue_name(queue)
        self._check_publish(envelope, delay)
        doc = encode_document(envelope, queue, delay)
        self._ensure_indexes()
        with self._driver(f"publish to {queue!r}"):
            self._collection.insert_one(doc)

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Insert messages in ordered batches of 1000 (``insert_many``), keeping their order.

        Raises:
            OperationalError: a batch failed; the message says how many were accepted
                (always a prefix of ``envelopes``: inserts are ordered).
        """
        self._check_open()
        validate_queue_name(queue)
        total = 0
        batch: list[dict[str, Any]] = []
        for envelope in envelopes:
            self._check_publish(envelope, delay)
            batch.append(encode_document(envelope, queue, delay))
            if len(batch) >= _INSERT_BATCH:
                total += self._insert_batch(batch, queue, total)
                batch = []
        if batch:
            total += self._insert_batch(batch, queue, total)
        return total

    def _insert_batch(self, batch: list[dict[str, Any]], queue: str, done: int) -> int:
        self._ensure_indexes()
        try:
            with self._driver(f"publish_many to {queue!r}"):
                try:
                    self._collection.insert_many(batch, ordered=True)
                except mongo_errors.BulkWriteError as exc:
                    inserted = int(exc.details.get("nInserted", 0))
                    raise OperationalError(
                        f"publish_many to {queue!r} on {mask_url(self.url)}: only "
                        f"{done + inserted} message(s) were accepted: {mask_text(str(exc))}"
                    ) from exc
        except (ConnectionLost, OperationTimeout) as exc:
            raise type(exc)(
                f"{exc} ({done} message(s) accepted before this batch; of the batch of "
                f"{len(batch)}, a prefix may have been accepted)"
            ) from exc.__cause__
        return len(batch)

    # ------------------------------------------------------------------ receive
    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Claim up to ``max_messages`` ready messages, each with one atomic
        ``find_one_and_update``; poll with capped backoff until one arrives or ``timeout``.

        Raises:
            ConfigurationError: no queues, bad names, ``max_messages`` < 1, bad timeout.
            OperationalError: the server could not be reached.
        """
        self._check_open()
        names = self._check_receive(queues, max_messages, timeout)
        limit = min(max_messages, _MAX_MESSAGES)
        self._ensure_indexes()
        deadline = time.monotonic() + timeout
        pause = self.options.poll_interval
        while True:
            got = self._claim(names, limit)
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, self.options.max_poll_interval)
            self._check_open()

    def _due_for_promotion(self, names: Sequence[str]) -> list[str]:
        now = time.monotonic()
        with self._lock:
            due = [q for q in names if now >= self._promote_at.get(q, 0.0)]
            for q in due:
                self._promote_at[q] = now + self.options.promote_interval
        return due

    def _promote(self, names: Sequence[str]) -> None:
        """Flip due delayed messages of ``names`` to ready (each document atomically)."""
        selector: Any = names[0] if len(names) == 1 else {"$in": list(names)}
        with self._driver(f"promote delayed messages of {list(names)!r}"):
            self._collection.update_many(
                {"queue": selector, "state": _DELAYED, "due": {"$lte": _now()}},
                {"$set": {"state": _READY}},
            )

    def _claim(self, names: list[str], limit: int) -> list[Delivery]:
        """One claim pass: up to ``limit`` deliveries, or none if nothing is ready."""
        promote = self._due_for_promotion(names)
        if promote:
            self._promote(promote)
        selector: Any = names[0] if len(names) == 1 else {"$in": names}
        with self._driver(f"receive from {names!r}"):
            if limit == 1:
                return self._finish(names, *self._claim_one(selector))
            for _ in range(_BATCH_ATTEMPTS):
                docs, token, candidates = self._claim_batch(selector, limit)
                if docs or not candidates:
                    return self._finish(names, docs, token)
                # Every candidate went to other consumers between our two steps: look again.
        return []

    def _dead_fields(self, queue: str) -> dict[str, Any]:
        """What moves a document to ``queue``'s dead-letter queue (``dead_reason`` apart)."""
        return {
            "queue": self.dead_letter_queue(queue),
            "state": _READY,
            "lease_owner": None,
            "lease_expires": _EPOCH,
            "delivery_count": 0,
            "dead_from": queue,
            "dead_at": _now(),
        }

    def _finish(self, names: list[str], docs: list[dict[str, Any]], token: str) -> list[Delivery]:
        """Deliveries of the claimed ``docs``; the ones that are not messages are
        dead-lettered as stand-ins (never raised, never returned, never left to come back)."""
        deliveries: list[Delivery] = []
        for doc in docs:
            try:
                deliveries.append(decode_document(doc, token, names))
            except Exception as exc:  # any shape of bad document
                self._dead_letter_undecodable(doc, token, names, undecodable_reason(exc))
        self._leases.hold((_id_key(d.receipt.doc_id), token) for d in deliveries)
        return deliveries

    def _dead_letter_undecodable(
        self, doc: Mapping[str, Any], token: str, names: list[str], reason: str
    ) -> None:
        queue = doc.get("queue")
        source = queue if isinstance(queue, str) and queue in names else names[0]
        log.error("dead-lettering a document of %r (_id %r): %s", source, doc.get("_id"), reason)
        original = {
            k: clean_text(repr(doc.get(k)), 2000)
            for k in ("message_id", "content_type", "content_encoding", "headers", "priority")
        }
        message_id = doc.get("message_id")
        stand_in = {
            **self._dead_fields(source),
            "dead_reason": reason,
            "message_id": message_id if isinstance(message_id, str) else original["message_id"],
            "content_type": UNDECODABLE_CONTENT_TYPE,
            "content_encoding": "binary",
            "headers": json.dumps({ORIGINAL_HEADER: original}),
            "priority": 0,
            "correlation_id": None,
            "reply_to": None,
            "due": _now(),
        }
        if not isinstance(doc.get("body"), bytes):
            stand_in["body"] = clean_text(repr(doc.get("body")), 16_000).encode()
        try:
            self._collection.update_one(
                {"_id": {"$eq": doc["_id"]}, "lease_owner": {"$eq": token}}, {"$set": stand_in}
            )
        except Exception as exc:  # never out of receive(): the lease runs out, it comes back
            log.warning("could not dead-letter %r (it comes back later): %s", doc["_id"], exc)

    def _claim_one(self, selector: Any) -> tuple[list[dict[str, Any]], str]:
        """The claim: ONE ``find_one_and_update``, atomic on the document it picks."""
        token = f"{self._instance}:{next(self._sequence)}"
        now = _now()
        doc = self._collection.find_one_and_update(
            {"queue": selector, "state": _READY, "lease_expires": {"$lte": now}},
            self._stamp(token, now),
            sort=_CLAIM_ORDER,
            return_document=ReturnDocument.AFTER,
        )
        return ([] if doc is None else [doc]), token

    def _claim_batch(self, selector: Any, limit: int) -> tuple[list[dict[str, Any]], str, int]:
        """Claim up to ``limit`` messages in three round trips, whatever ``limit`` is.

        1. read the ids of the best ``limit`` ready messages (claim order, index only);
        2. ``update_many`` those ids *with the readiness filter repeated*, stamping one fresh
           lease token: MongoDB updates each document atomically and only if it still
           matches the filter when it is written, so a message another consumer claimed in
           between is skipped, never shared;
        3. read back the documents that carry our token.

        Returns the documents (claim order), their lease token and how many candidates step
        1 found.
        """
        now = _now()
        ready = {"queue": selector, "state": _READY, "lease_expires": {"$lte": now}}
        ids = [
            d["_id"]
            for d in self._collection.find(ready, {"_id": 1}, sort=_CLAIM_ORDER, limit=limit)
        ]
        if not ids:
            return [], "", 0
        token = f"{self._instance}:{next(self._sequence)}"
        try:
            self._collection.update_many({**ready, "_id": {"$in": ids}}, self._stamp(token, now))
        except mongo_errors.PyMongoError:
            # Stopped part-way (the server failed): give back what it stamped, so those
            # messages need not wait for the lease to run out. Their delivery_count keeps
            # the claim (counted as a delivery: the safe side of worker_max_deliveries).
            self._collection.update_many(
                {"lease_owner": token}, {"$set": {"lease_owner": None, "lease_expires": _EPOCH}}
            )
            raise
        docs = list(self._collection.find({"_id": {"$in": ids}, "lease_owner": token}))
        # Rank by position in ``ids`` (already claim order): no field of a document that
        # something else wrote is trusted to sort by.
        rank = {i: n for n, i in enumerate(map(_id_key, ids))}
        docs.sort(key=lambda d: rank.get(_id_key(d["_id"]), 0))
        return docs, token, len(ids)

    def _stamp(self, token: str, now: datetime) -> list[dict[str, Any]]:
        """The claim's update: lease owner and expiry, and the next delivery_count."""
        lease = {"lease_owner": token, "lease_expires": self._lease_end(now)}
        return [{"$set": {**lease, "delivery_count": _NEXT_COUNT}}]

    def _lease_end(self, now: datetime) -> datetime:
        return _ceil_ms(now + timedelta(seconds=float(self.options.lease_seconds)))

    # ------------------------------------------------------------------ settle
    @staticmethod
    def _receipt(delivery: Delivery) -> _Receipt:
        receipt = getattr(delivery, "receipt", None)
        if not isinstance(receipt, _Receipt):
            raise InvalidReceipt(f"not a delivery of a MongoDBBroker: {delivery!r}")
        return receipt

    def _was_settled(self, receipt: _Receipt) -> bool:
        return self._leases.was_settled(_id_key(receipt.doc_id), receipt.token)

    def _settle(self, receipt: _Receipt) -> None:
        self._leases.settle(_id_key(receipt.doc_id), receipt.token)

    def _lost(self, receipt: _Receipt) -> bool:
        """After a guarded write matched nothing: True when the document still exists (held
        by a newer delivery, or back in a queue): the lease was lost. False when gone."""
        return self._collection.find_one({"_id": {"$eq": receipt.doc_id}}, {"_id": 1}) is not None

    def _lost_lease(self, delivery: Delivery) -> InvalidReceipt:
        return InvalidReceipt(
            f"delivery of {delivery.envelope.id!r} on {delivery.queue!r} no longer holds "
            "its message (lease expired and it was redelivered)"
        )

    def ack(self, delivery: Delivery) -> None:
        """Delete the message if this delivery still holds it. Idempotent.

        Raises:
            InvalidReceipt: the lease was lost and the message was redelivered (it will be,
                or was, processed again; nothing is lost).
            ConnectionLost: the broker is closed or the server unreachable.
        """
        self._check_open()
        receipt = self._receipt(delivery)
        with self._driver("ack"):
            result = self._collection.delete_one(_guard(receipt))
            lost = result.deleted_count == 0 and self._lost(receipt)
        if lost and not self._was_settled(receipt):
            self._settle(receipt)
            raise self._lost_lease(delivery)
        self._settle(receipt)

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Requeue (ready now, ``redelivered`` next time) or move to ``<queue>.dead``.

        Idempotent: rejecting the same delivery again does nothing.

        Raises:
            InvalidReceipt: the lease was lost to another consumer before this call.
            ConnectionLost: the broker is closed or the server unreachable.
        """
        self._check_open()
        receipt = self._receipt(delivery)
        guard = _guard(receipt)
        update: dict[str, Any]
        if requeue:
            update = {"$set": {"lease_owner": None, "lease_expires": _EPOCH}}
        else:
            fields = self._dead_fields(delivery.queue)
            update = {"$set": {**fields, "dead_reason": clean_reason(reason)}}
        with self._driver("reject"):
            result = self._collection.update_one(guard, update)
            lost = result.matched_count == 0 and self._lost(receipt)
        if lost and not self._was_settled(receipt):
            self._settle(receipt)
            raise self._lost_lease(delivery)
        self._settle(receipt)

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Hold ``delivery`` for ``seconds`` from now (client clock). One guarded update.

        Raises:
            InvalidReceipt: the delivery is settled or its lease was taken over.
            ConfigurationError: ``seconds`` is not a positive number.
        """
        self._check_open()
        seconds = _check_seconds(seconds, "seconds")
        receipt = self._receipt(delivery)
        if self._was_settled(receipt):
            raise InvalidReceipt(f"delivery of {delivery.envelope.id!r} was already settled")
        with self._driver("extend"):
            result = self._collection.update_one(
                _guard(receipt),
                {"$set": {"lease_expires": _ceil_ms(_now() + timedelta(seconds=seconds))}},
            )
        if result.matched_count == 0:
            raise InvalidReceipt(
                f"delivery of {delivery.envelope.id!r} on {delivery.queue!r} is not held by "
                "this consumer any more"
            )

    # ------------------------------------------------------------------ purge, size
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue`` (not held ones, where an expired
        lease counts as not held); return how many. One ``delete_many``."""
        self._check_open()
        validate_queue_name(queue)
        with self._driver(f"purge {queue!r}"):
            now = _now()
            result = self._collection.delete_many(
                {
                    "queue": queue,
                    "$or": [{"lease_owner": None}, {"lease_expires": {"$lte": now}}],
                }
            )
        return int(result.deleted_count)

    def size(self, queue: str) -> int:
        """Count ready messages of ``queue``: due and not held (an expired lease counts as
        ready; a due delayed message counts even before it is promoted)."""
        self._check_open()
        validate_queue_name(queue)
        with self._driver(f"size of {queue!r}"):
            now = _now()
            return int(
                self._collection.count_documents(
                    {"queue": queue, "due": {"$lte": now}, "lease_expires": {"$lte": now}}
                )
            )

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Give back every message this broker still holds (ready at once, delivered next
        with ``redelivered=True``) and close the client if this broker built it.

        Idempotent; never raises for a server that is gone (the leases then simply expire).
        Afterwards every method raises :class:`ConnectionLost`.
        """
        with self._lock:
            if self._closed:
                return
            held = self._leases.take_all()
        try:
            if held:
                self._release(held)
        except Exception:  # close must not fail; the leases expire on their own
            log.warning(
                "could not release %d held message(s) on close of %r; they will be "
                "redelivered when their leases expire",
                len(held),
                self,
                exc_info=True,
            )
        finally:
            with self._lock:
                self._closed = True
            if self._owns_client:
                self._client.close()

    def _release(self, held: dict[Any, str]) -> None:
        items = list(held.items())
        for start in range(0, len(items), _RELEASE_BATCH):
            chunk = items[start : start + _RELEASE_BATCH]
            with self._driver("release leases"):
                # Tokens are unique per claim, so a document another consumer claimed since
                # (a new token) is left alone.
                self._collection.update_many(
                    {
                        "_id": {"$in": [_id_value(key) for key, _ in chunk]},
                        "lease_owner": {"$in": [token for _, token in chunk]},
                    },
                    {"$set": {"lease_owner": None, "lease_expires": _EPOCH}},
                )

"""MongoDB result backend in Celery 5.7's own layout (``mongodb://``, ``mongodb+srv://``).

Capabilities:
    ``native_ttl`` (a TTL index on our own ``expires_at`` field, ``expireAfterSeconds=0``;
    reads never return an expired document, whether or not MongoDB's TTL monitor, which runs
    about once a minute, has deleted it yet), ``expiry_sweep`` (:meth:`purge_expired`
    deletes, in batches, expired documents the monitor has not reached and documents Celery
    wrote, which have no ``expires_at``), ``groups`` (``celery_groupmeta``), ``counters``
    (atomic ``incr`` with ``$inc`` and idempotent ``add_member`` with ``$addToSet``, in
    ``conveyor_counters``), ``multi_reader``, ``durable`` (per the URL's write concern),
    ``cross_process``. Not ``wait``: readers poll (:func:`conveyor.core.wait_for`).

URL:
    ``mongodb://[user:pass@]host[:port][,host2...]/[database][?options]`` or
    ``mongodb+srv://...``, handed to :class:`pymongo.MongoClient` untouched except that
    conveyor's options (below) are removed from the query. The database is the ``database``
    option, else the URL's path, else ``celery`` (Celery's default, so both find the same
    collections).

Options (keyword > URL query > default; :class:`MongoDBResultBackendOptions`):
    ``default_ttl`` (86400.0: Celery's ``result_expires``), ``serializer`` (``json``:
    Celery's ``result_serializer``), ``accept`` (serializers ``fetch`` decodes; default: the
    serializer alone), ``database``, ``taskmeta_collection`` (``celery_taskmeta``),
    ``groupmeta_collection`` (``celery_groupmeta``) -- the names of Celery's
    ``mongodb_backend_settings`` --, ``counter_collection`` (``conveyor_counters``),
    ``create_indexes`` (True), and the driver defaults of the MongoDB broker
    (``connect_timeout``, ``server_selection_timeout``, ``operation_timeout``), applied only
    when the URL does not set the driver's own option.

Thread-safety:
    One instance may be shared by the threads of one process (:class:`pymongo.MongoClient`
    is thread-safe). Not fork-safe: build a new instance after ``fork()``.

Celery compatibility (``docs/celery-compat.md#mongodb-result-documents``;
``docs/stores/mongodb.md``):

* Task documents: ``_id`` = task id, ``status``, ``result`` = the result (or exception
  document) encoded with the result serializer -- a *string* of JSON text for ``json`` and
  other text serializers, BSON binary for ``msgpack``/``pickle`` --, ``traceback``,
  ``children`` (native array of result tuples), ``date_done`` (BSON date, ready states only),
  ``group_id``/``parent_id`` when set, and the ``result_extended`` fields (``name``,
  ``args``, ``kwargs``, ``worker``, ``retries``, ``queue``) as native values. Celery 5.7
  reads them with ``AsyncResult``; we read what Celery writes (also 5.0-5.3 string
  ``date_done``).
* A stored SUCCESS is never overwritten, in ONE write: ``replace_one({_id, status !=
  SUCCESS}, doc, upsert=True)``, whose upsert fails with ``DuplicateKeyError`` (swallowed)
  exactly when a live SUCCESS is there -- Celery 5.7's own rule. An *expired* SUCCESS that the
  TTL monitor has not deleted yet counts as absent.
* Groups: ``_id`` = group id, ``result`` = the encoded list of member task ids, ``date_done``.
* ``expires_at`` is ours (Celery ignores unknown fields and never writes it). Documents Celery
  wrote (no ``expires_at``) expire ``default_ttl`` after their ``date_done``, as Celery's
  ``backend_cleanup`` decides; non-ready ones without ``date_done`` never expire, as in
  Celery. A Celery ``replace_one`` drops our ``expires_at`` and the same rule then applies.
* Indexes: ``date_done`` on both Celery collections (the one Celery creates), a TTL index on
  ``expires_at`` on all three collections. All created idempotently on first use.
* Times: the client clock; ``date_done`` in UTC. Needs MongoDB 4.4 or later (pipeline
  updates and aggregation expressions in ``find_one_and_update`` projections, used by the
  counters).

Ids are data, never queries: every task id, group id, group member and counter key is
checked with :meth:`~conveyor.core.base.ResultBackendBase.validate_task_id`'s rules (a
non-empty ``str``, no NUL, valid UTF-8, at most 1024 bytes) on every read, write and delete,
before any filter is built. A ``dict`` such as ``{"$ne": None}`` or ``{"$regex": "."}`` would
otherwise be a query operator (reading, enumerating or deleting other tasks' results); it
raises ``ConfigurationError``. Any other string is stored and read back exactly.

Documents: a value BSON cannot hold (a lone surrogate, a NUL in a key, a non-string key, an
unknown type), an ``extended`` field whose name starts with ``$`` or contains ``.`` (no
top-level field of a replacement document may), or a document the server refuses as such
(codes 2, 52, 55, 56, 57) raises :class:`~conveyor.core.errors.EncodeError`, never an
``OperationalError``: a retry would send the same document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from pymongo import ASCENDING, IndexModel, MongoClient, ReturnDocument
from pymongo import errors as mongo_errors
from pymongo.collection import Collection

from conveyor._drivers.mongodb import DRIVER_ERRORS, connect, split_mongodb_url, translate_error
from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase, check_default_ttl
from conveyor.core.capabilities import Capability
from conveyor.core.celery import group_from_meta, meta_from_record, record_from_meta
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    OperationTimeout,
)
from conveyor.core.options import build_options
from conveyor.core.serializers import SerializerRegistry
from conveyor.core.types import READY_STATES, GroupRecord, ResultRecord, State
from conveyor.core.urls import mask_text, mask_url

__all__ = ["MongoDBResultBackend", "MongoDBResultBackendOptions"]

log = logging.getLogger("conveyor.backends.mongodb")

_UTC = timezone.utc
_SUCCESS = State.SUCCESS.value
_FETCH_CHUNK = 1000
_UPSERT_ATTEMPTS = 5
#: Server codes that refuse a document as such (bad value, ``$``-prefixed, DBRef, empty or
#: dotted field name): a retry sends the same document.
_DOCUMENT_REFUSED = frozenset({2, 52, 55, 56, 57})
#: Fields of a task document that are not result meta keys.
_STORAGE_FIELDS = frozenset({"_id", "expires_at"})
#: Meta keys an ``extended`` mapping may not overwrite in a task document.
_RESERVED = frozenset(
    {
        "_id",
        "task_id",
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "expires_at",
    }
)


@dataclass(frozen=True)
class MongoDBResultBackendOptions:
    """Options of :class:`MongoDBResultBackend` (seconds as float).

    Attributes:
        default_ttl: lifetime of a record, group or counter stored with ``ttl=None``; also
            the lifetime after ``date_done`` of documents Celery wrote. ``None``/0: forever
            (explicit configuration only).
        serializer: result serializer name (Celery's ``result_serializer``).
        accept: serializers ``fetch`` may decode; empty means ``(serializer,)``.
        database: database name; None takes the URL's path, else ``celery``.
        taskmeta_collection, groupmeta_collection: Celery's collection names
            (``mongodb_backend_settings``).
        counter_collection: conveyor's counters and join sets.
        create_indexes: create the indexes on first use (idempotent).
        connect_timeout, server_selection_timeout, operation_timeout: driver defaults, as
            for the MongoDB broker.
    """

    default_ttl: float | None = DEFAULT_RESULT_TTL
    serializer: str = "json"
    accept: tuple[str, ...] = ()
    database: str | None = None
    taskmeta_collection: str = "celery_taskmeta"
    groupmeta_collection: str = "celery_groupmeta"
    counter_collection: str = "conveyor_counters"
    create_indexes: bool = True
    connect_timeout: float | None = 10.0
    server_selection_timeout: float | None = 10.0
    operation_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        check_default_ttl(self.default_ttl)
        for name in ("connect_timeout", "server_selection_timeout", "operation_timeout"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float) and value > 0 and math.isfinite(value)
            ):
                raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")
        for name in ("taskmeta_collection", "groupmeta_collection", "counter_collection"):
            value = getattr(self, name)
            if not value or "$" in value or "\x00" in value or value.startswith("."):
                raise ConfigurationError(f"invalid MongoDB collection name {value!r}")
        if self.database is not None and (
            not self.database or any(c in self.database for c in '/\\. "$\x00')
        ):
            raise ConfigurationError(f"invalid MongoDB database name {self.database!r}")


_OPTION_NAMES = frozenset(f.name for f in fields(MongoDBResultBackendOptions))


def _brief(value: str) -> str:
    """An id as error messages show it: its ``repr``, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _aware(value: Any) -> Any:
    """BSON dates come back naive (UTC) unless the client is ``tz_aware``."""
    if isinstance(value, datetime) and (value.tzinfo is None or value.utcoffset() is None):
        return value.replace(tzinfo=_UTC)
    return value


class MongoDBResultBackend(ResultBackendBase):
    """Result backend in Celery's MongoDB collections; see the module docstring.

    Args:
        client: a ready :class:`pymongo.MongoClient` (closed by ``close`` only when this
            backend built it in :meth:`from_url`).
        options: :class:`MongoDBResultBackendOptions`; defaults when None.
        serializers: the serializer registry (default: the process-wide one).
        url: the URL shown (masked) in ``repr`` and errors.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.NATIVE_TTL,
            Capability.EXPIRY_SWEEP,
            Capability.GROUPS,
            Capability.COUNTERS,
            Capability.MULTI_READER,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        client: MongoClient[dict[str, Any]],
        options: MongoDBResultBackendOptions | None = None,
        *,
        serializers: SerializerRegistry | None = None,
        url: str | None = None,
        _owns_client: bool = False,
    ) -> None:
        self.options = opts = options or MongoDBResultBackendOptions()
        self._client = client
        self._owns_client = _owns_client
        self.url = url or "mongodb://"
        self._set_up_results(opts, serializers)
        database = client[opts.database or client.get_default_database("celery").name]
        self._tasks: Collection[dict[str, Any]] = database[opts.taskmeta_collection]
        self._groups: Collection[dict[str, Any]] = database[opts.groupmeta_collection]
        self._counters: Collection[dict[str, Any]] = database[opts.counter_collection]
        self._indexes_ready = not opts.create_indexes
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, *, serializers: SerializerRegistry | None = None, **options: Any
    ) -> MongoDBResultBackend:
        """Build a backend with its own long-lived client (closed by ``close``).

        Does not wait for the server; the first operation does (and creates the indexes).

        Raises:
            InvalidURL: not a MongoDB URL, or pymongo rejects the URI.
            ConfigurationError: unknown option or bad value.
        """
        driver_url, query = split_mongodb_url(url, _OPTION_NAMES)
        opts = build_options(
            MongoDBResultBackendOptions, query, options, owner="mongodb result backend"
        )
        client = connect(
            driver_url,
            url,
            connect_timeout=opts.connect_timeout,
            server_selection_timeout=opts.server_selection_timeout,
            operation_timeout=opts.operation_timeout,
        )
        try:
            return cls(client, opts, serializers=serializers, url=url, _owns_client=True)
        except BaseException:
            client.close()
            raise

    @property
    def client(self) -> MongoClient[dict[str, Any]]:
        """The PyMongo client."""
        return self._client

    # ------------------------------------------------------------------ driver boundary
    @contextlib.contextmanager
    def _driver(self, what: str) -> Iterator[None]:
        """Every driver call runs in here: closed check, indexes, error translation."""
        self._check_open()
        try:
            if not self._indexes_ready:
                self._create_indexes()
            yield
        except DRIVER_ERRORS as exc:
            if self._closed:
                raise ConnectionLost(f"{self!r} is closed") from exc
            raise translate_error(exc, what=what, url=self.url) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    def create_indexes(self) -> None:
        """Create the ``date_done`` and TTL indexes if missing (also with
        ``create_indexes=False``, which only stops doing it on first use). Idempotent and
        race-safe."""
        with self._driver("create indexes"):
            self._create_indexes()

    def _create_indexes(self) -> None:
        ttl = IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0)
        # Exactly Celery's create_index('date_done', background=True): MongoDB >= 4.2 ignores
        # the background flag, but a server that compares it (SecantusDB) would otherwise
        # refuse Celery's request with IndexKeySpecsConflict.
        done = IndexModel([("date_done", ASCENDING)], background=True)
        for collection, models in (
            (self._tasks, [done, ttl]),
            (self._groups, [done, ttl]),
            (self._counters, [ttl]),
        ):
            try:
                collection.create_indexes(models)
            except mongo_errors.OperationFailure as exc:
                if exc.code not in (85, 86):  # an equivalent index exists under another name
                    raise
                log.warning("%s: keeping existing indexes: %s", collection.full_name, exc)
        self._indexes_ready = True

    # ------------------------------------------------------------------ expiry
    def _expires_at(self, ttl: float | None, now: datetime) -> datetime | None:
        seconds = self._ttl(ttl)
        if seconds is None or math.isinf(seconds):
            return None
        try:
            return now + timedelta(seconds=seconds)
        except OverflowError:  # beyond year 9999: as good as forever
            return None

    def _cutoff(self, now: datetime) -> datetime | None:
        """``date_done`` before which a Celery-written document has expired, or None."""
        ttl = self.default_ttl
        if ttl is None or math.isinf(ttl):
            return None
        try:
            return now - timedelta(seconds=ttl)
        except OverflowError:
            return None

    def _alive(self, doc: Mapping[str, Any], now: datetime) -> bool:
        """Whether ``doc`` has not expired at ``now``: ours by ``expires_at``; Celery's (no
        ``expires_at``) by ``date_done`` + ``default_ttl``, keeping those without a
        ``date_done`` (non-ready) or with a pre-5.4 string one, as Celery keeps them.

        Checked on the client after a lookup by ``_id``: the lookup stays a plain primary-key
        read, and the rule is the exact complement of :meth:`_dead`.
        """
        expires = _aware(doc.get("expires_at"))
        if isinstance(expires, datetime):
            return expires > now
        if expires is not None:
            return True  # not a date: the TTL index ignores it, and so do we
        cutoff = self._cutoff(now)
        done = _aware(doc.get("date_done"))
        return cutoff is None or not isinstance(done, datetime) or done > cutoff

    def _dead(self, now: datetime) -> list[dict[str, Any]]:
        """``$or`` clauses matching documents that have expired at ``now``."""
        dead: list[dict[str, Any]] = [{"expires_at": {"$lte": now}}]
        cutoff = self._cutoff(now)
        if cutoff is not None:
            dead.append({"expires_at": None, "date_done": {"$lte": cutoff}})
        return dead

    # ------------------------------------------------------------------ encoding
    def _encode(self, value: Any) -> str | bytes:
        """Celery's ``encode``: JSON text as a *string*; binary serializers as bytes."""
        body, _, encoding = self._serializers.encode(value, self._serializer.name)
        if encoding == "binary":
            return body
        return body.decode("utf-8")

    def _decode(self, data: Any) -> Any:
        if data is None:
            return None
        if not isinstance(data, str | bytes | bytearray | memoryview):
            return data  # Celery's 'bson' serializer stores native values
        return self._serializers.decode(
            data,
            self._serializer.content_type,
            self._serializer.content_encoding,
            accept=self._accept,
        )

    def _task_document(
        self, record: ResultRecord, now: datetime, ttl: float | None
    ) -> dict[str, Any]:
        meta = meta_from_record(record, include_task_id=False)
        done = record.date_done
        if done is None and record.state in READY_STATES:
            done = now
        doc: dict[str, Any] = {
            "_id": record.task_id,
            "status": record.state.value,
            "result": self._encode(meta["result"]),
            "traceback": record.traceback,
            "children": record.children,
            "date_done": _aware(done),
        }
        if record.group_id:
            doc["group_id"] = record.group_id
        if record.parent_id:
            doc["parent_id"] = record.parent_id
        for key, value in record.extended.items():
            if key in _RESERVED:
                continue
            if not isinstance(key, str) or not key or key.startswith("$") or "." in key:
                raise EncodeError(
                    f"extended field {key!r} cannot be a MongoDB field name (a top-level field "
                    "may not be empty, start with '$' or contain '.')"
                )
            doc[key] = value
        expires = self._expires_at(ttl, now)
        if expires is not None:
            doc["expires_at"] = expires
        return doc

    def _record(self, doc: Mapping[str, Any]) -> ResultRecord:
        task_id = doc.get("_id")
        if not isinstance(task_id, str):
            raise DecodeError(f"task document _id must be a string, got {task_id!r}")
        meta = {k: v for k, v in doc.items() if k not in _STORAGE_FIELDS}
        meta["result"] = self._decode(doc.get("result"))
        meta["date_done"] = _aware(doc.get("date_done"))
        return record_from_meta(meta, task_id)

    @staticmethod
    @contextlib.contextmanager
    def _document_refusals(what: str) -> Iterator[None]:
        """Server refusals of a document as such become ``EncodeError`` (not transient)."""
        try:
            yield
        except mongo_errors.OperationFailure as exc:
            if exc.code not in _DOCUMENT_REFUSED:
                raise
            first = mask_text((str(exc).strip().splitlines() or [""])[0][:300])
            raise EncodeError(f"{what}: the server refused the document: {first}") from exc

    # ------------------------------------------------------------------ ResultBackend
    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Save ``record``; a live SUCCESS is never replaced (one conditional upsert).

        Raises:
            ConfigurationError: a refused task id (see ``validate_task_id``), bad ``ttl``.
            EncodeError: the result cannot be serialized, the document exceeds 16 MiB or
                holds what BSON or the server refuses (see Documents above).
            OperationalError: the server could not be reached.
        """
        self._check_open()
        record = self._check_record(record)
        try:
            state = State(record.state)
        except ValueError:
            raise ConfigurationError(f"unknown task state {record.state!r}") from None
        if state is not record.state:
            record = dataclasses.replace(record, state=state)
        now = datetime.now(_UTC)
        doc = self._task_document(record, now, ttl)
        task_id = record.task_id
        what = f"store result {_brief(task_id)}"
        with self._driver(what), self._document_refusals(what):
            for _ in range(_UPSERT_ATTEMPTS):
                try:
                    # Celery 5.7's write: replace anything but a SUCCESS, or insert.
                    self._tasks.replace_one(
                        {"_id": task_id, "status": {"$ne": _SUCCESS}}, doc, upsert=True
                    )
                    return
                except mongo_errors.DuplicateKeyError:
                    pass  # a SUCCESS is stored, or another writer inserted concurrently
                # A SUCCESS that has expired (the TTL monitor has not deleted it yet) counts
                # as absent: replace it, again only if it is still expired when written.
                if self._tasks.replace_one(
                    {"_id": task_id, "$or": self._dead(now)}, doc
                ).matched_count:
                    return
                current = self._tasks.find_one({"_id": task_id}, {"status": 1})
                if current is not None and current.get("status") == _SUCCESS:
                    return  # a live SUCCESS: a redelivered duplicate never replaces it
                # The document changed or vanished between our steps: decide again.
        raise OperationTimeout(
            f"store result {_brief(task_id)} on {mask_url(self.url)}: still contended after "
            f"{_UPSERT_ATTEMPTS} attempts"
        )

    def fetch(self, task_id: str) -> ResultRecord | None:
        """Return the record for ``task_id``, or ``None`` if unknown or expired."""
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        with self._driver(f"fetch result {_brief(task_id)}"):
            doc = self._tasks.find_one({"_id": task_id})
        if doc is None or not self._alive(doc, datetime.now(_UTC)):
            return None
        return self._record(doc)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Return the live records among ``task_ids``: one query per 1000 ids."""
        self._check_open()
        wanted = list(dict.fromkeys(self._check_ids(task_ids)))
        found: dict[str, ResultRecord] = {}
        for start in range(0, len(wanted), _FETCH_CHUNK):
            chunk = wanted[start : start + _FETCH_CHUNK]
            with self._driver(f"fetch {len(chunk)} results"):
                docs = list(self._tasks.find({"_id": {"$in": chunk}}))
            now = datetime.now(_UTC)
            for doc in docs:
                if self._alive(doc, now):
                    record = self._record(doc)
                    found[record.task_id] = record
        return found

    def forget(self, task_id: str) -> None:
        """Delete the record for ``task_id``. Idempotent."""
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        with self._driver(f"forget result {_brief(task_id)}"):
            self._tasks.delete_one({"_id": task_id})

    def close(self) -> None:
        """Close the client if this backend built it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()

    # ------------------------------------------------------------------ groups
    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Save the membership of ``record.group_id`` (replacing any previous one), as
        Celery does: ``result`` = the encoded list of member ids, ``date_done``."""
        self._check_open()
        record = self._check_group(record)
        members = list(record.task_ids)
        now = datetime.now(_UTC)
        doc: dict[str, Any] = {
            "_id": record.group_id,
            "result": self._encode(members),
            "date_done": _aware(record.date_done) or now,
        }
        expires = self._expires_at(ttl, now)
        if expires is not None:
            doc["expires_at"] = expires
        with self._driver(f"store group {_brief(record.group_id)}"):
            self._groups.replace_one({"_id": record.group_id}, doc, upsert=True)

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """Return the group or ``None`` if unknown or expired."""
        self._check_open()
        group_id = self._check_id(group_id, "group id")
        with self._driver(f"fetch group {_brief(group_id)}"):
            doc = self._groups.find_one({"_id": group_id})
        if doc is None or not self._alive(doc, datetime.now(_UTC)):
            return None
        ids = self._decode(doc.get("result"))
        return group_from_meta({"result": ids, "date_done": _aware(doc.get("date_done"))}, group_id)

    def forget_group(self, group_id: str) -> None:
        """Delete the group record (not its members' results). Idempotent."""
        self._check_open()
        group_id = self._check_id(group_id, "group id")
        with self._driver(f"forget group {_brief(group_id)}"):
            self._groups.delete_one({"_id": group_id})

    # ------------------------------------------------------------------ counters
    def _counter_update(
        self,
        key: str,
        fresh: Any,
        updated: Any,
        ttl: float | None,
        projection: dict[str, Any],
    ) -> dict[str, Any]:
        """ONE atomic ``find_one_and_update`` (pipeline update) on the counter ``key``.

        The pipeline sets the counted field to ``fresh`` when the document has expired (the
        TTL monitor has not deleted it yet) and to ``updated`` otherwise, and refreshes
        ``expires_at``, all in the same write. The filter is the bare ``_id``.

        A missing document is first created empty with ``insert_one`` (a concurrent creator
        makes ours fail with ``DuplicateKeyError``, which is fine), then updated. No upsert:
        a retry after an upsert that failed in a race is only safe if the failed upsert
        changed nothing, and SecantusDB 0.7 was seen to count one increment twice that way
        under load (MongoDB itself retries such races on the server).
        """
        field = "value" if "value" in projection else "members"
        now = datetime.now(_UTC)
        expired = {
            "$and": [
                {"$eq": [{"$type": "$expires_at"}, "date"]},
                {"$lte": ["$expires_at", now]},
            ]
        }
        expires = self._expires_at(ttl, now)
        stage = {
            field: {"$cond": [expired, fresh, updated]},
            "expires_at": expires if expires is not None else "$$REMOVE",
        }
        seed: dict[str, Any] = {"_id": key, field: 0 if field == "value" else []}
        if expires is not None:
            seed["expires_at"] = expires
        for _ in range(_UPSERT_ATTEMPTS):
            doc = self._counters.find_one_and_update(
                {"_id": key},
                [{"$set": stage}],
                projection=projection,
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc
            with contextlib.suppress(mongo_errors.DuplicateKeyError):
                self._counters.insert_one(dict(seed))
        raise OperationTimeout(
            f"counter {_brief(key)} on {mask_url(self.url)}: deleted again and again while being "
            f"created ({_UPSERT_ATTEMPTS} attempts)"
        )

    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to counter ``key`` (missing or expired: 0); refresh its
        ttl. One ``find_one_and_update`` (pipeline update); a missing counter is created
        with ``insert_one`` first.

        Raises:
            ConfigurationError: ``amount`` not a 64-bit int, a refused ``key``.
        """
        self._check_open()
        key = self._check_id(key, "counter key")
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int)
            or not -(2**63) <= amount < 2**63
        ):
            raise ConfigurationError(f"amount must be a 64-bit int, got {amount!r}")
        added = {"$add": [{"$ifNull": ["$value", 0]}, {"$literal": amount}]}
        with self._driver(f"incr {_brief(key)}"):
            doc = self._counter_update(
                key, {"$literal": amount}, added, ttl, {"_id": 0, "value": 1}
            )
        return int(doc.get("value", 0))

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """Atomically add ``member`` to set ``key``; return its size. Idempotent per member.

        One ``find_one_and_update`` (pipeline update with ``$setUnion``; a missing set is
        created with ``insert_one`` first); the size is computed by the server in the same
        step (projection ``$size``), so concurrent adders each see a distinct count.

        Raises:
            ConfigurationError: a refused ``key`` or ``member``.
        """
        self._check_open()
        key = self._check_id(key, "counter key")
        member = self._check_id(member, "member")
        one = [{"$literal": member}]
        union = {"$setUnion": [{"$ifNull": ["$members", []]}, one]}
        with self._driver(f"add_member {_brief(key)}"):
            doc = self._counter_update(
                key, one, union, ttl, {"_id": 0, "size": {"$size": "$members"}}
            )
        return int(doc.get("size", 0))

    def forget_key(self, key: str) -> None:
        """Delete counter or set ``key``. Idempotent."""
        self._check_open()
        key = self._check_id(key, "counter key")
        with self._driver(f"forget key {_brief(key)}"):
            self._counters.delete_one({"_id": key})

    # ------------------------------------------------------------------ expiry sweep
    def purge_expired(self, *, batch_size: int = 1000) -> int:
        """Delete expired documents of all three collections, ``batch_size`` at a time.

        MongoDB's TTL monitor deletes our documents by itself (about once a minute); this
        also removes what it has not reached yet and the documents Celery wrote (no
        ``expires_at``; expired ``default_ttl`` after ``date_done``, as Celery's
        ``backend_cleanup`` would). Returns how many were deleted.

        Raises:
            ConfigurationError: ``batch_size`` < 1.
        """
        self._check_open()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
        total = 0
        for collection, celery_owned in (
            (self._tasks, True),
            (self._groups, True),
            (self._counters, False),
        ):
            while True:
                now = datetime.now(_UTC)
                dead = self._dead(now) if celery_owned else [{"expires_at": {"$lte": now}}]
                with self._driver(f"purge expired from {collection.name}"):
                    ids = [
                        d["_id"]
                        for d in collection.find({"$or": dead}, {"_id": 1}, limit=batch_size)
                    ]
                    if not ids:
                        break
                    result = collection.delete_many({"_id": {"$in": ids}, "$or": dead})
                total += int(result.deleted_count)
                if len(ids) < batch_size:
                    break
        return total

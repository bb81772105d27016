"""MongoDB broker: leased claims, each an atomic conditional update of one document.

Capabilities:
    ``at_least_once`` (every delivery is a lease: owner token + expiry; an expired lease is
    delivered again with ``redelivered=True``), ``lease_extension`` (``extend``),
    ``delayed_delivery`` (a ``due`` time with its own index: delayed messages stay in the
    collection, never in worker memory), ``priority`` (0-9, higher first, FIFO within one
    priority), ``dead_letter`` (``reject(requeue=False)`` moves the message to the queue
    ``<queue>.dead`` and records the reason in the field ``dead_reason``, delivered as the
    header ``x-conveyor-dead-letter-reason``), ``queue_size``, ``durable`` (as durable as the
    write concern of the URL: ``w=majority`` for replica-set durability), ``cross_process``.

Limits and bad input:
    A delay must end before the year 10000 (BSON dates as Python reads them); a longer one
    raises ``ConfigurationError`` at publish. Queue names, ids and lease tokens are always
    strings compared with plain equality, never query operators; an envelope id must be a
    string. A claimed document that cannot become a delivery (a document written by something
    else: headers that are not JSON text of a map, a dict or number for an id, a body that is
    not binary, a priority that is not an integer) is never handed out and never left to come
    back: in the same claim it is moved to ``<queue>.dead`` with content type
    ``application/x-conveyor-undecodable``, its original fields in the header
    ``x-conveyor-original`` and the reason recorded (``conveyor.transports._common``); the
    other messages of the claim are returned. A ``delivery_count`` that is not a number moves
    its document the same way; one below 0 restarts at 1 and one that cannot grow stays where
    it is (far past any ``worker_max_deliveries``: the message is refused).

URL:
    ``mongodb://[user:pass@]host[:port][,host2:port...]/[database][?options]`` and
    ``mongodb+srv://user:pass@cluster.example.net/[database][?options]``. The URL goes to
    :class:`pymongo.MongoClient` untouched, except that the query keys which are conveyor
    options (below) are removed first; a key that is neither conveyor's nor a MongoDB URI
    option is an error (pymongo would only warn and ignore it). Driver options
    (``replicaSet``, ``w``, ``tls``, ``authSource``, ``readPreference``,
    ``serverSelectionTimeoutMS``, ...) therefore work unchanged, and so do replica-set and SRV
    URLs. The database is the ``database`` option, else the URL's path, else ``conveyor``.

Options (keyword > URL query > default; :class:`MongoDBBrokerOptions`):
    ``lease_seconds`` (60.0), ``poll_interval`` (0.01) and ``max_poll_interval`` (0.2): the
    capped exponential backoff of a blocking ``receive``; ``promote_interval`` (0.1): how
    often one broker moves due delayed messages to ready; ``database`` (None: from the URL);
    ``collection`` (``conveyor_messages``); ``create_indexes`` (True: create the indexes on
    first use, idempotently); driver defaults applied only when the URL does not set the
    driver's own option: ``connect_timeout`` (10.0 -> ``connectTimeoutMS``),
    ``server_selection_timeout`` (10.0 -> ``serverSelectionTimeoutMS``),
    ``operation_timeout`` (30.0 -> ``socketTimeoutMS``; ignored when the URL sets
    ``timeoutMS``).

Thread-safety:
    One instance may be shared by the threads of one process: :class:`pymongo.MongoClient`
    is thread-safe and pools connections, and the broker's own bookkeeping (held leases,
    settled receipts) is guarded by a lock. PyMongo clients are not fork-safe: build a new
    broker in each process (never share one across ``fork()``).

How it works (``docs/backends/mongodb.md`` has the document layout):

* One collection, ``conveyor_messages``. A message document has ``queue``, ``state``
  (``ready`` or ``delayed``), ``priority``, ``due``, ``lease_owner``, ``lease_expires``,
  ``delivery_count`` and the envelope (``body`` as BSON binary, ``headers`` as JSON text,
  because header names may contain ``.`` or start with ``$``, which are not safe field
  names). ``ack`` deletes the document.
* A claim is ONE ``find_one_and_update`` on ``{queue, state: ready, lease_expires <= now}``
  sorted by ``priority`` descending then ``_id`` ascending, which sets a fresh lease owner
  token and expiry and increments ``delivery_count`` (an update pipeline: ``_NEXT_COUNT``);
  MongoDB applies it atomically to one document, so two consumers never hold the same
  message. ``receive(max_messages=n)`` with ``n > 1`` claims up to ``n`` messages in three
  round trips instead of ``n``: it reads the ids of the best ``n`` ready messages, then
  ``update_many`` on those ids *with the same readiness filter* stamps one fresh token
  (MongoDB updates each document atomically and only if it still matches when written, so a
  message another consumer took in between is skipped, never shared), then reads back the
  documents carrying the token. With several queues one claim covers them all
  (``queue: {$in: ...}``): higher priority first, then the oldest message.
* ``ack``, ``reject`` and ``extend`` are guarded by the lease owner token: a consumer whose
  lease expired and whose message was claimed again gets :class:`InvalidReceipt`.
* Delayed messages carry ``state: delayed``, outside the claim's index range; every
  ``promote_interval`` a receiving broker flips the due ones to ``ready`` with one
  ``update_many``. Thousands of future messages therefore never slow a claim down.
* Time is the CLIENT clock (UTC ``datetime``), used consistently for due times and leases:
  keep the clocks of producers and consumers in sync (NTP); a skew of ``s`` seconds makes
  delays and lease expiries early or late by ``s``. Stored times are rounded up to whole
  milliseconds (BSON dates), so nothing is ever due or expired early.
* FIFO within one priority follows ``_id`` (an ObjectId made by the driver): strict for
  one producer process; messages of different producers published within the same second
  are ordered by the ObjectId's process-random part.
* ``receive`` polls with capped backoff (10 ms doubling to 200 ms); no change stream is
  used (they need a replica set and not every MongoDB-protocol server has them).
* PyMongo reconnects by itself and retries a failed read or write once (``retryReads``,
  ``retryWrites`` on replica sets); every other driver error becomes a conveyor error in
  :func:`translate_error`, the one mapping used by this broker and the MongoDB result
  backend.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar
from urllib.parse import unquote_plus

from bson.errors import BSONError, InvalidBSON
from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient, ReturnDocument
from pymongo import errors as mongo_errors
from pymongo.collection import Collection
from pymongo.uri_parser import split_options

from conveyor.core.base import BrokerBase, HeldLeases, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    EncodeError,
    InvalidReceipt,
    InvalidURL,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import build_options, closest
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import mask_text, mask_url, parse_url
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
    clamp_priority,
    clean_reason,
    clean_text,
    undecodable_reason,
)

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "MONGODB_SCHEMES",
    "MongoDBBroker",
    "MongoDBBrokerOptions",
    "driver_defaults",
    "driver_option_names",
    "split_mongodb_url",
    "translate_error",
]

#: URL schemes served by the MongoDB broker and result backend.
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")

log = logging.getLogger("conveyor.transports.mongodb")

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)  # lease_expires of a message nobody holds
_READY = "ready"
_DELAYED = "delayed"
_INSERT_BATCH = 1000
_RELEASE_BATCH = 500
_SETTLED_MEMORY = 10_000  # receipts remembered so a second ack/reject is a no-op
_MAX_MESSAGES = 1000
_BATCH_ATTEMPTS = 3  # batch claims that lost every candidate to other consumers, in a row
_CLAIM_ORDER = [("priority", DESCENDING), ("_id", ASCENDING)]
_CLAIM_INDEX = "conveyor_claim"
_DUE_INDEX = "conveyor_due"
# OperationFailure codes: auth and permission problems, index conflicts, server time limits.
_CONFIG_CODES = frozenset({13, 18, 85, 86, 8000})  # Unauthorized, AuthFailed, index clash
_TIMEOUT_CODES = frozenset({50, 262})  # MaxTimeMSExpired, ExceededTimeLimit


# ============================================================================ shared helpers


def split_mongodb_url(url: str, option_names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Split conveyor's options out of a MongoDB URL; everything else stays as written.

    Only the ``key=value`` items of the query whose key is one of ``option_names`` are
    removed (their values percent-decoded); every other character of the URL reaches
    pymongo unchanged (``replicaSet``, ``readPreferenceTags``, commas in host lists...).

    Returns:
        ``(driver_url, conveyor_options)``.

    Raises:
        InvalidURL: not a ``mongodb://`` or ``mongodb+srv://`` URL, or no host.
        ConfigurationError: a query key is neither one of ``option_names`` nor a MongoDB URI
            option (pymongo itself would only warn), or a driver option has a bad value.
    """
    parsed = parse_url(url)  # validates scheme, hosts and ports; masks passwords in errors
    if parsed.scheme not in MONGODB_SCHEMES:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a MongoDB URL: use 'mongodb://host:27017/database' "
            "or 'mongodb+srv://cluster.example.net/database'"
        )
    if not parsed.hosts:
        raise InvalidURL(f"{mask_url(url)!r} names no host")
    text = url.strip()
    head, sep, query = text.partition("?")
    if not sep:
        return text, {}
    names = frozenset(option_names)
    delimiter = ";" if "&" not in query and ";" in query else "&"
    kept: list[str] = []
    ours: dict[str, str] = {}
    for item in query.split(delimiter):
        if not item:
            continue
        key, _, value = item.partition("=")
        name = unquote_plus(key)
        if name in names:
            ours[name] = unquote_plus(value)  # a repeated key: the last one wins
        else:
            kept.append(item)
    driver_url = f"{head}?{delimiter.join(kept)}" if kept else head
    _check_driver_options(url, delimiter.join(kept), names)
    return driver_url, ours


def driver_option_names() -> frozenset[str] | None:
    """The URI options pymongo knows, lower-cased, from its own tables
    (``pymongo.common.URI_OPTIONS_VALIDATOR_MAP`` plus aliases and deprecated spellings; older
    releases: ``VALIDATORS``). None if this pymongo has neither."""
    from pymongo import common

    table = getattr(common, "URI_OPTIONS_VALIDATOR_MAP", None)
    if not isinstance(table, Mapping):
        table = getattr(common, "VALIDATORS", None)
    if not isinstance(table, Mapping) or not table:
        return None
    names = {str(k).lower() for k in table}
    for extra in ("URI_OPTIONS_ALIAS_MAP", "URI_OPTIONS_DEPRECATION_MAP"):
        more = getattr(common, extra, None)
        if isinstance(more, Mapping):
            names.update(str(k).lower() for k in more)
    return frozenset(names)


def _check_driver_options(url: str, query: str, names: frozenset[str]) -> None:
    """Refuse query keys that are neither conveyor's nor the driver's (pymongo would only
    warn and ignore them, so a typo such as ``lease_secnds`` would pass silently).

    Keys are checked against pymongo's own table of URI options, never by reading its error
    text (pymongo 4.20 stopped naming the unknown key there). Values are then validated by
    pymongo itself. Without a table (a pymongo that has none), each key is tried alone with
    pymongo's parser, so the error still names the right key.
    """
    if not query:
        return
    delimiter = ";" if "&" not in query and ";" in query else "&"
    items = [item for item in query.split(delimiter) if item]
    known = driver_option_names()
    for item in items:
        key = unquote_plus(item.partition("=")[0])
        if known is not None:
            unknown = key.lower() not in known
        else:
            try:
                split_options(item, validate=True, warn=False)
                unknown = False
            except mongo_errors.ConfigurationError:
                unknown = True  # or a bad value: the suggestion below tells which is likely
            except (ValueError, TypeError):
                unknown = False  # a bad value; reported by the whole-query check below
        if unknown:
            hint = closest(key, names) or closest(key.lower(), known or ())
            did = f" Did you mean {hint!r}?" if hint else ""
            raise ConfigurationError(
                f"{mask_url(url)!r}: unknown option {mask_url(key)[:100]!r}.{did} conveyor "
                f"options: {', '.join(sorted(names))}; any other key must be a MongoDB URI "
                "option"
            )
    try:
        split_options(query, validate=True, warn=False)
    except (mongo_errors.ConfigurationError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"{mask_url(url)!r}: {mask_text(str(exc))}") from None


def driver_defaults(
    driver_url: str,
    *,
    connect_timeout: float | None,
    server_selection_timeout: float | None,
    operation_timeout: float | None,
) -> dict[str, Any]:
    """Keyword arguments for :class:`pymongo.MongoClient` that the URL does not set itself.

    PyMongo lets keywords override URL options, so a default is only passed when the URL
    (case-insensitively, as pymongo reads it) has no value of its own.
    """
    query = driver_url.partition("?")[2]
    present = {
        unquote_plus(item.partition("=")[0]).lower()
        for item in query.replace(";", "&").split("&")
        if item
    }
    kwargs: dict[str, Any] = {}
    if "appname" not in present:
        kwargs["appname"] = "conveyor"
    if connect_timeout is not None and "connecttimeoutms" not in present:
        kwargs["connectTimeoutMS"] = max(1, round(connect_timeout * 1000))
    if server_selection_timeout is not None and "serverselectiontimeoutms" not in present:
        kwargs["serverSelectionTimeoutMS"] = max(1, round(server_selection_timeout * 1000))
    if (
        operation_timeout is not None
        and "sockettimeoutms" not in present
        and "timeoutms" not in present
    ):
        kwargs["socketTimeoutMS"] = max(1, round(operation_timeout * 1000))
    return kwargs


def translate_error(exc: BaseException, *, what: str, url: str) -> ConveyorError:
    """The ONE mapping from PyMongo/BSON errors to conveyor's tree (broker and backend).

    * server unreachable (``ServerSelectionTimeoutError``), dropped connections, primary
      changes (``AutoReconnect``, ``NotPrimaryError``, ``ConnectionFailure``), a closed client
      (``InvalidOperation``) -> :class:`ConnectionLost`;
    * socket or server time limits (``NetworkTimeout``, ``ExecutionTimeout``,
      ``WTimeoutError``, CSOT timeouts) -> :class:`OperationTimeout`;
    * documents BSON cannot hold or that exceed 16 MiB, text that is not valid Unicode
      (``UnicodeEncodeError``) -> :class:`EncodeError`;
    * stored documents that cannot be read (``InvalidBSON``: a date out of range, bad
      UTF-8; ``UnicodeDecodeError``) -> :class:`DecodeError`;
    * bad URI or client options, authentication and permission failures, index conflicts
      -> :class:`ConfigurationError` (:class:`InvalidURL` for the URI);
    * any other server error -> :class:`OperationalError`.

    Classified by exception class and server error code, never by message text. The
    message names the operation, the masked URL and the driver's first line (never a
    password: every text goes through :func:`mask_text`). Callers chain it:
    ``raise translate_error(exc, ...) from exc``.
    """
    where = f"{what} on {mask_url(url)}"
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    detail = mask_text(first) or type(exc).__name__
    if isinstance(exc, mongo_errors.ServerSelectionTimeoutError):
        return ConnectionLost(f"{where}: no server reachable: {detail}")
    timeouts = (
        mongo_errors.NetworkTimeout,
        mongo_errors.ExecutionTimeout,
        mongo_errors.WTimeoutError,
    )
    if isinstance(exc, timeouts):
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, mongo_errors.PyMongoError) and exc.timeout:
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, mongo_errors.ConnectionFailure):  # AutoReconnect, NotPrimaryError, ...
        return ConnectionLost(f"{where}: connection lost: {detail}")
    if isinstance(exc, mongo_errors.InvalidOperation):
        return ConnectionLost(f"{where}: the client is closed: {detail}")
    if isinstance(exc, InvalidBSON | UnicodeDecodeError):  # reading, not storing
        return DecodeError(f"{where}: a stored document cannot be read: {detail}")
    if isinstance(exc, UnicodeEncodeError):  # BSON strings are UTF-8: a lone surrogate
        return EncodeError(f"{where}: BSON cannot hold the text: {detail}")
    if isinstance(exc, BSONError | mongo_errors.DocumentTooLarge | OverflowError):
        return EncodeError(f"{where}: the document cannot be stored: {detail}")
    if isinstance(exc, mongo_errors.InvalidURI):
        return InvalidURL(f"{where}: {detail}")
    if isinstance(exc, mongo_errors.ConfigurationError):
        return ConfigurationError(f"{where}: {detail}")
    if isinstance(exc, mongo_errors.OperationFailure):
        code = exc.code
        if code in _TIMEOUT_CODES:
            return OperationTimeout(f"{where}: timed out: {detail}")
        if code in _CONFIG_CODES:
            return ConfigurationError(f"{where}: {detail} (code {code})")
        return OperationalError(f"{where}: {detail} (code {code})")
    return OperationalError(f"{where}: {detail}")


#: What a driver call may raise that :func:`translate_error` maps (``UnicodeError``: BSON
#: encodes and decodes strings as UTF-8).
_DRIVER_ERRORS = (mongo_errors.PyMongoError, BSONError, OverflowError, UnicodeError)


def _now() -> datetime:
    """The client clock, aware UTC. BSON keeps milliseconds: used as "now" in filters it is
    truncated (floor), so ``due <= now`` never lets a message through early."""
    return datetime.now(_UTC)


def _ceil_ms(value: datetime) -> datetime:
    """Round up to a whole millisecond, so a stored deadline is never earlier than asked."""
    extra = value.microsecond % 1000
    return value if extra == 0 else value + timedelta(microseconds=1000 - extra)


def _check_seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigurationError(f"{what} must be a positive number of seconds: {value!r}")
    return float(value)


def _check_queue(name: str) -> None:
    """Queue names as everywhere, plus dead-letter names (``<name>.dead``, maybe repeated),
    which may exceed the 200-character limit of user-chosen names."""
    base = name
    while (
        isinstance(base, str)
        and base.endswith(DEAD_LETTER_SUFFIX)
        and len(base) > len(DEAD_LETTER_SUFFIX)
    ):
        base = base[: -len(DEAD_LETTER_SUFFIX)]
    validate_queue_name(base)


# ================================================================================= options


@dataclass(frozen=True)
class MongoDBBrokerOptions:
    """Options of :class:`MongoDBBroker` (seconds as float).

    Attributes:
        lease_seconds: how long a delivery stays held without ``extend`` (> 0).
        poll_interval: first sleep of a blocking ``receive`` that found nothing.
        max_poll_interval: the backoff cap; also the worst-case latency of an idle consumer.
        promote_interval: minimum time between two "move due delayed messages to ready"
            steps of one broker (bounds how late a delayed message may be, on top of
            polling); 0 promotes on every poll.
        database: database name; None takes the URL's path, else ``conveyor``.
        collection: the message collection.
        create_indexes: create the claim and due-time indexes on first use (idempotent).
        connect_timeout: default for the driver's ``connectTimeoutMS``.
        server_selection_timeout: default for the driver's ``serverSelectionTimeoutMS``:
            how long an operation waits for a usable server before ``ConnectionLost``.
        operation_timeout: default for the driver's ``socketTimeoutMS``.
    """

    lease_seconds: float = 60.0
    poll_interval: float = 0.01
    max_poll_interval: float = 0.2
    promote_interval: float = 0.1
    database: str | None = None
    collection: str = "conveyor_messages"
    create_indexes: bool = True
    connect_timeout: float | None = 10.0
    server_selection_timeout: float | None = 10.0
    operation_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("lease_seconds", "poll_interval", "max_poll_interval"):
            _check_seconds(getattr(self, name), name)
        if self.max_poll_interval < self.poll_interval:
            raise ConfigurationError("max_poll_interval must be >= poll_interval")
        if not (isinstance(self.promote_interval, int | float) and self.promote_interval >= 0):
            raise ConfigurationError(f"promote_interval must be >= 0: {self.promote_interval!r}")
        for name in ("connect_timeout", "server_selection_timeout", "operation_timeout"):
            value = getattr(self, name)
            if value is not None:
                _check_seconds(value, name)
        if self.database is not None and not _valid_database_name(self.database):
            raise ConfigurationError(f"invalid MongoDB database name {self.database!r}")
        if not _valid_collection_name(self.collection):
            raise ConfigurationError(f"invalid MongoDB collection name {self.collection!r}")


_OPTION_NAMES = frozenset(f.name for f in fields(MongoDBBrokerOptions))


def _valid_database_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in '/\\. "$\x00') and len(name) < 64


def _valid_collection_name(name: str) -> bool:
    return bool(name) and "$" not in name and "\x00" not in name and not name.startswith(".")


# ================================================================================== broker

# delivery_count as a claim sets it (an update pipeline, so it stays one round trip): a
# count below 0 (planted, it would lift worker_max_deliveries) restarts at 1; a count at
# _COUNT_MAX or more stays (2**63-1 + 1 cannot be stored: the claim would fail for the whole
# queue; so far past worker_max_deliveries the message is refused); a missing count is 0; a
# count that is not a number (text, an array) is left as it is, and the claim that picks the
# document dead-letters it (``_delivery`` refuses it) instead of failing like $inc would.
_COUNT_MAX = 2**31 - 1
_COUNT = {"$ifNull": ["$delivery_count", 0]}
_NEXT_COUNT = {
    "$switch": {
        "branches": [
            {
                "case": {"$not": [{"$in": [{"$type": _COUNT}, ["int", "long", "double"]]}]},
                "then": _COUNT,
            },
            {"case": {"$lt": [_COUNT, 0]}, "then": 1},
            {"case": {"$gte": [_COUNT, _COUNT_MAX]}, "then": _COUNT},
        ],
        "default": {"$add": [_COUNT, 1]},
    }
}


def _guard(receipt: _Receipt) -> dict[str, Any]:
    """The filter "this delivery still holds its document". ``$eq``: a document id that is
    itself a map is compared, never read as query operators."""
    return {"_id": {"$eq": receipt.doc_id}, "lease_owner": {"$eq": receipt.token}}


class _AnyId:
    """A document id that is not hashable (a map or list some other writer chose), made
    usable as a key by its ``repr``; :func:`_id_value` gives the id back."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = repr(value)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AnyId) and other.key == self.key


def _id_key(doc_id: Any) -> Any:
    """A hashable key for a document id (ObjectIds and strings are their own)."""
    try:
        hash(doc_id)
    except TypeError:
        return _AnyId(doc_id)
    return doc_id


def _id_value(key: Any) -> Any:
    return key.value if isinstance(key, _AnyId) else key


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``ack``/``reject``/``extend`` need: the document and this claim's lease token."""

    doc_id: Any
    token: str


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
        driver_url, query = split_mongodb_url(url, _OPTION_NAMES)
        opts = build_options(MongoDBBrokerOptions, query, options, owner="mongodb broker")
        kwargs = driver_defaults(
            driver_url,
            connect_timeout=opts.connect_timeout,
            server_selection_timeout=opts.server_selection_timeout,
            operation_timeout=opts.operation_timeout,
        )
        try:
            client: MongoClient[dict[str, Any]] = MongoClient(driver_url, **kwargs)
        except (mongo_errors.PyMongoError, ValueError, TypeError) as exc:
            if isinstance(exc, mongo_errors.PyMongoError):
                raise translate_error(exc, what="create client", url=url) from exc
            raise ConfigurationError(
                f"bad MongoDB URL {mask_url(url)!r}: {mask_text(str(exc))}"
            ) from None
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
        except _DRIVER_ERRORS as exc:
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
        _check_queue(name)
        self._ensure_indexes()

    def _document(self, envelope: Envelope, queue: str, delay: float | None) -> dict[str, Any]:
        try:
            headers = json.dumps(dict(envelope.headers), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise EncodeError(
                f"headers of {envelope.id!r} are not JSON-representable: {exc}"
            ) from exc
        if not isinstance(envelope.body, bytes | bytearray | memoryview):
            raise EncodeError(f"body of {envelope.id!r} must be bytes")
        now = _now()
        due = now
        if delay is not None and delay > 0:
            try:
                due = _ceil_ms(now + timedelta(seconds=float(delay)))
            except (OverflowError, ValueError):
                raise ConfigurationError(
                    f"delay {delay!r}s is longer than the MongoDB broker can hold: its due time "
                    "must be before the year 10000 (BSON dates as Python reads them)"
                ) from None
        return {
            "queue": queue,
            "state": _DELAYED if due is not now else _READY,
            "priority": int(envelope.priority),
            "due": due,
            "lease_owner": None,
            "lease_expires": _EPOCH,
            "delivery_count": 0,
            "message_id": envelope.id,
            "body": bytes(envelope.body),
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "headers": headers,
            "correlation_id": envelope.correlation_id,
            "reply_to": envelope.reply_to,
            "published_at": now,
        }

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Insert one message (acknowledged by the server with the URL's write concern).

        Raises:
            UnsupportedFeature: never (priority and delay are supported).
            ConfigurationError: bad queue name, priority outside 0-9, negative delay.
            EncodeError: headers not JSON-representable, or the message exceeds 16 MiB.
            OperationalError: the server could not be reached; the message was not accepted.
        """
        self._check_open()
        _check_queue(queue)
        self._check_publish(envelope, delay)
        doc = self._document(envelope, queue, delay)
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
        _check_queue(queue)
        total = 0
        batch: list[dict[str, Any]] = []
        for envelope in envelopes:
            self._check_publish(envelope, delay)
            batch.append(self._document(envelope, queue, delay))
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
        names = list(dict.fromkeys(self._queue_list_checked(queues)))
        if isinstance(max_messages, bool) or not isinstance(max_messages, int):
            raise ConfigurationError(f"max_messages must be an int, got {max_messages!r}")
        if max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages}")
        if not (isinstance(timeout, int | float) and timeout >= 0 and math.isfinite(timeout)):
            raise ConfigurationError(f"timeout must be a non-negative number: {timeout!r}")
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

    @staticmethod
    def _queue_list_checked(queues: str | Sequence[str]) -> list[str]:
        names = [queues] if isinstance(queues, str) else list(queues)
        if not names:
            raise ConfigurationError("receive() needs at least one queue")
        for name in names:
            _check_queue(name)
        return names

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
                deliveries.append(self._delivery(doc, token, names))
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

    @staticmethod
    def _delivery(doc: Mapping[str, Any], token: str, names: Sequence[str]) -> Delivery:
        raw = doc.get("headers")
        headers = json.loads(raw) if isinstance(raw, str) else None
        if not isinstance(headers, dict):
            raise DecodeError(f"headers are not JSON text of a map: {raw!r:.100}")
        if doc.get("dead_from") is not None:
            headers[DEAD_LETTER_REASON_HEADER] = str(doc.get("dead_reason") or "")
            headers[DEAD_LETTER_SOURCE_HEADER] = str(doc["dead_from"])
        queue = doc.get("queue")
        if not (isinstance(queue, str) and queue in names):
            raise DecodeError(f"queue is not one of the names received from: {queue!r:.100}")
        for name in ("message_id", "content_type", "content_encoding"):
            if not isinstance(doc.get(name), str):
                raise DecodeError(f"{name} is not a string: {doc.get(name)!r:.100}")
        for name in ("correlation_id", "reply_to"):
            if not isinstance(doc.get(name), str | None):
                raise DecodeError(f"{name} is not a string: {doc.get(name)!r:.100}")
        body = doc.get("body")
        if not isinstance(body, bytes):  # BSON binary (subtype 0) reads as bytes
            raise DecodeError(f"body is not binary: {type(body).__name__}")
        count = doc.get("delivery_count")
        if isinstance(count, float) and count.is_integer():
            count = int(count)  # a number $inc made from a double some client wrote
        if isinstance(count, bool) or not isinstance(count, int):
            raise DecodeError(f"delivery_count is not an integer: {count!r:.40}")
        count = max(count, 1)  # claimed: delivered at least once, whatever was stored
        envelope = Envelope(
            id=doc["message_id"],
            body=body,
            content_type=doc["content_type"],
            content_encoding=doc["content_encoding"],
            headers=headers,
            priority=clamp_priority(doc.get("priority")),
            correlation_id=doc.get("correlation_id"),
            reply_to=doc.get("reply_to"),
        )
        return Delivery(
            envelope=envelope,
            queue=queue,
            receipt=_Receipt(doc["_id"], token),
            redelivered=count > 1,
            delivery_count=count,
        )

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

    def dead_letter_queue(self, queue: str) -> str:
        """``queue + ".dead"``: an ordinary queue (receive, ack, purge and size work on it)."""
        return queue + DEAD_LETTER_SUFFIX

    # ------------------------------------------------------------------ purge, size
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue`` (not held ones, where an expired
        lease counts as not held); return how many. One ``delete_many``."""
        self._check_open()
        _check_queue(queue)
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
        _check_queue(queue)
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

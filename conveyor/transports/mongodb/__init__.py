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

How it works (``docs/stores/mongodb.md`` has the document layout):

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

Modules: :mod:`.broker` (the broker), :mod:`.documents` (envelopes as documents and back,
receipts, the claim's count update), :mod:`.options`; the URL, client and error plumbing it
shares with the result backend is :mod:`conveyor._drivers.mongodb`.
"""

from __future__ import annotations

from conveyor._drivers.mongodb import (
    MONGODB_SCHEMES,
    driver_defaults,
    driver_option_names,
    split_mongodb_url,
    translate_error,
)
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
)
from conveyor.transports.mongodb.broker import MongoDBBroker
from conveyor.transports.mongodb.options import MongoDBBrokerOptions

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

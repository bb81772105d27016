"""Redis broker in kombu's key layout, with atomic leased claims (``redis://``, ``sentinel://``).

Capabilities:
    ``at_least_once`` (every delivery is a lease recorded in Redis in the same atomic step
    that takes it off the ready list; a consumer killed at any instant loses nothing; an
    expired lease is delivered again with ``redelivered=True``), ``lease_extension``
    (``extend``: a live worker's heartbeat keeps a long task from ever being redelivered),
    ``delayed_delivery`` (a sorted set per queue on the server's clock, promoted atomically
    when due; never held by a consumer), ``priority`` (kombu's priority lists; see
    "Priorities"), ``dead_letter`` (``reject(requeue=False)`` moves the message to the
    ordinary queue ``<queue>.dead``, the reason in the JSON header
    ``x-conveyor-dead-letter-reason`` of the stored envelope), ``queue_size``, ``durable`` (as
    durable as the server's persistence settings), ``cross_process``.

Limits and bad input:
    A delay is kept to the millisecond up to 2**52 ms (about 142,000 years: scores are doubles);
    a longer one raises ``ConfigurationError`` at publish. A claimed envelope that cannot be
    decoded (not JSON, ``Infinity`` for a priority, headers that are not an object or come
    after another object, its own ``x-delivery-count`` header, ...) is never handed out: it is
    replaced in ``<queue>.dead`` by a well-formed envelope of content type
    ``application/x-conveyor-undecodable`` whose body is the original text and whose reason
    header says what was wrong (``conveyor.transports._common``), in the same claim, and the
    other messages of the claim are returned.

URL:
    ``redis://[[user]:password@]host[:6379][/db]``, ``rediss://...`` (TLS;
    ``?ssl_cert_reqs=required|optional|none`` (also ``CERT_REQUIRED`` ...), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``; certificates are verified
    unless told otherwise, unlike kombu which falls back to ``CERT_NONE``),
    ``redis+socket:///path/to/redis.sock[?virtual_host=db]``,
    ``sentinel://[:password@]h1:26379[/db];sentinel://h2:26379`` with the option
    ``master_name`` (required; ``sentinel_kwargs`` or ``sentinel_password`` authenticate to
    the sentinels; the URL's password authenticates to the master). Any other query key must
    be one of the options below (kombu raises ``TypeError`` for them; conveyor accepts its
    own options there and names the closest one on a typo).

Options (keyword > URL query > default; :class:`RedisBrokerOptions`):
    ``lease_seconds`` (60.0) how long a delivery stays held without ``extend``;
    ``poll_interval`` (0.1) the longest a blocked ``receive`` sleeps between claims (the
    wake-up latency for messages pushed by producers that do not wake conveyor consumers,
    e.g. a Celery client); ``reclaim_batch`` (100) / ``promote_batch`` (500) expired leases
    restored / due delayed messages promoted per queue per claim; ``global_keyprefix`` ('')
    kombu's key prefix (keys only, never values); ``priority_steps`` (``0,3,6,9``) and
    ``sep`` (``\\x06\\x16``) kombu's priority lists; ``socket_timeout`` (30.0),
    ``socket_connect_timeout`` (5.0), ``socket_keepalive`` (True), ``health_check_interval``
    (25.0), ``max_connections`` (None: unbounded pool), ``max_retries`` (3) and
    ``retry_backoff_cap`` (1.0) for commands that hit a connection error, ``client_name``;
    Sentinel: ``master_name``, ``sentinel_kwargs``, ``sentinel_username``,
    ``sentinel_password``; TLS: the ``ssl_*`` keys above.

Thread-safety:
    One instance may be shared by the threads of one process: commands go through redis-py's
    thread-safe connection pool (one long-lived pool per instance) and the broker's own
    bookkeeping (held leases, settled receipts) is guarded by a lock. Never share an instance
    across ``fork()``: build one per process.

Key layout (``docs/stores/redis.md`` has the full table; ``P`` = ``global_keyprefix``):

* kombu's, so Celery 5.x clients and workers interoperate: ready list ``P<queue>`` (priority
  step 0) and ``P<queue>\\x06\\x16<step>`` for the other steps; producers ``LPUSH``, consumers
  pop from the right (FIFO); each element is kombu's JSON envelope (base64 ``body``,
  ``content-type``/``content-encoding``, ``headers``, ``properties`` with ``correlation_id``,
  ``reply_to``, ``delivery_mode`` 2, ``delivery_info`` ``{"exchange": "", "routing_key":
  queue}``, ``priority``, ``body_encoding`` ``base64``, a fresh uuid4 ``delivery_tag``).
  ``declare_queue`` adds ``<queue>\\x06\\x16\\x06\\x16<queue>`` to the set
  ``P_kombu.binding.<queue>``, as a Celery worker does.
* conveyor's own, all with the hash tag ``{<queue>}`` so one queue's bookkeeping shares a
  Cluster slot (with an empty prefix, the same slot as the step-0 ready list):
  ``Pconveyor:{<queue>}:leases`` (hash: lease id -> ``<step>:<envelope>``),
  ``Pconveyor:{<queue>}:deadlines`` (sorted set: lease id -> deadline, ms),
  ``Pconveyor:{<queue>}:delayed`` (sorted set: ``<step>:<envelope>`` -> due time, ms),
  ``Pconveyor:{<queue>}:wake`` (list of wake-up tokens, capped at 64, expires).
  Times are the server's clock (``TIME`` inside the scripts), so clients with skewed clocks
  agree on delays and leases.

How a receive works (atomic and low-latency at once):

* ``claim.lua`` runs for all the queues of a ``receive`` in ONE script: it restores expired
  leases (front of their list, marked redelivered), promotes due delayed messages, then
  ``RPOP``\\s up to ``max_messages`` envelopes in priority-major, queue-minor order (kombu's
  ``BRPOP`` key order) and records each under a lease in the same step. There is no window
  in which a message exists only in a client's memory (kombu's ``BRPOP`` then ``HSET`` has
  one). Queue order rotates between calls for fairness.
* A blocking pop cannot also record a lease, so when nothing is ready the consumer blocks
  with ``BLPOP`` on the queues' *wake* lists instead, for at most ``poll_interval`` (and no
  longer than until the next delayed message is due or lease expires, as the claim reports).
  conveyor producers, requeues, releases and promotions push a token there, so a blocked
  conveyor consumer wakes at once; messages from producers that do not (a Celery client's
  bare ``LPUSH``) are found by the next claim, within ``poll_interval``.
* Redelivery marks are those of kombu's restore, so a Celery worker sees them too:
  ``headers.redelivered`` and ``properties.delivery_info.redelivered`` = true, plus
  ``headers["x-delivery-count"]`` = deliveries so far. They are inserted textually (the
  envelope is never re-encoded by Lua's cjson, which would corrupt ``[]`` and big integers)
  and removed again from the :class:`Envelope` a conveyor consumer gets.

Priorities:
    conveyor's priority is 0 (lowest, default) to 9 (highest). kombu on Redis serves LOWER
    numbers first (Celery's docs: "0 being highest priority" on Redis). So an envelope of
    conveyor priority ``p`` is stored with kombu priority ``9 - p``, in the list of the
    greatest step <= ``9 - p``, and read back the same way: a Celery client's ``priority=0``
    (its most urgent) arrives as conveyor priority 9 and is served first by conveyor and
    Celery workers alike, and a conveyor priority-9 message is the first a Celery worker
    serves. The price: conveyor's default (0) lives in ``<queue>\\x06\\x169`` while Celery's
    default (0, its most urgent) lives in ``<queue>``, so on a queue fed by both, Celery's
    unprioritised messages go first. With kombu's default steps ``0,3,6,9`` there are four
    levels (conveyor 9-7, 6-4, 3-1, 0); ``priority_steps=0,1,2,3,4,5,6,7,8,9`` gives ten
    (set the same ``priority_steps`` in Celery's ``broker_transport_options``: a Celery
    worker only reads the lists of its own steps).

Celery caveats:
    A Celery worker on the same queue uses kombu's own ``unacked`` hash and visibility
    timeout for what *it* takes; conveyor's leases never touch those keys. Celery's ETA
    messages are published ready; a conveyor worker hands early ones back with a delay
    (they then wait in ``conveyor:{queue}:delayed``, which a Celery worker does not read).
    Messages dead-lettered into ``<queue>.dead`` keep their original ``delivery_info``.

Modules: :mod:`.broker` (the broker), :mod:`.envelope` (kombu's envelope codec), :mod:`.keys`
(key layout and scripts), :mod:`.options`; the URL, connection and error plumbing it shares
with the result backend is :mod:`conveyor._drivers.redis`, whose ``lua/`` holds the scripts.
"""

from __future__ import annotations

from conveyor._drivers.redis import (
    TRANSIENT_REPLIES,
    RedisConnectionOptions,
    connect,
    reply_code,
)
from conveyor._drivers.redis import parse_redis_url as parse_redis_url
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
)
from conveyor.transports.redis.broker import RedisBroker
from conveyor.transports.redis.envelope import decode_envelope as decode_envelope
from conveyor.transports.redis.envelope import encode_envelope as encode_envelope
from conveyor.transports.redis.options import RedisBrokerOptions

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "TRANSIENT_REPLIES",
    "RedisBroker",
    "RedisBrokerOptions",
    "RedisConnectionOptions",
    "connect",
    "reply_code",
]

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

Key layout (``docs/backends/redis.md`` has the full table; ``P`` = ``global_keyprefix``):

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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from time import monotonic
from typing import Any, ClassVar, NoReturn, TypeVar

import redis
import redis.exceptions as rexc
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from conveyor._redis import HeldConnections, Script
from conveyor.core.base import BrokerBase, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    InvalidReceipt,
    InvalidURL,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import build_options
from conveyor.core.serializers import kombu_json_load, kombu_json_text
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import (
    ParsedURL,
    mask_text,
    mask_url,
    parse_url,
    scheme_of,
    split_alternates,
)
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    EXACT_MS_MAX_DELAY,
    UNDECODABLE_CONTENT_TYPE,
    check_delay,
    clean_reason,
    clean_text,
    undecodable_reason,
)

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "TRANSIENT_REPLIES",
    "RedisBroker",
    "RedisBrokerOptions",
    "RedisConnectionOptions",
    "connect",
    "redis_errors",
    "reply_code",
]

log = logging.getLogger("conveyor.transports.redis")

_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_MAX_MESSAGES = 1000
_PUBLISH_CHUNK = 1000
_SETTLED_MEMORY = 10_000
_WAKE_TTL_MS = 60_000
_WAKE_TTL_TEXT = str(_WAKE_TTL_MS)
_KOMBU_MAX_PRIORITY = 9
# Headers conveyor adds on redelivery; never part of the Envelope handed to a consumer.
_REDELIVERED = "redelivered"
_COUNT = "x-delivery-count"
_AMBIGUOUS = b"conveyor-ambiguous-headers:"  # common.lua's AMBIGUOUS
_COUNT_KEY = b'"x-delivery-count"'
_DELAY_WHY = "due times are sorted-set scores in milliseconds, exact below 2**53"

T = TypeVar("T")


# =============================================================================== options


@dataclass(frozen=True)
class RedisConnectionOptions:
    """Connection settings shared by the Redis broker and result backend (seconds as float).

    Attributes:
        socket_timeout: longest wait for one command's reply (None: forever; not advised).
        socket_connect_timeout: longest wait to establish a connection.
        socket_keepalive: TCP keepalive on every connection.
        health_check_interval: a connection idle this long is PINGed before reuse (0: off).
        max_connections: pool size limit (None: unbounded).
        max_retries: retries (with jittered exponential backoff) of a command that hit a
            connection error or timeout, a READONLY reply after a failover, or a server that
            is loading its data; each retry reconnects.
        retry_backoff_cap: the longest backoff between two retries.
        client_name: ``CLIENT SETNAME`` of every connection.
        master_name: Sentinel: the monitored master's name (required for ``sentinel://``).
        sentinel_kwargs: Sentinel: connection keywords for the sentinels themselves.
        sentinel_username, sentinel_password: Sentinel: credentials for the sentinels.
        ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname: TLS
            settings for ``rediss://`` (Celery's ``ssl_*`` URL keys).
    """

    socket_timeout: float | None = 30.0
    socket_connect_timeout: float | None = 5.0
    socket_keepalive: bool = True
    health_check_interval: float = 25.0
    max_connections: int | None = None
    max_retries: int = 3
    retry_backoff_cap: float = 1.0
    client_name: str | None = None
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] | None = field(default=None, repr=False)  # a password
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl_cert_reqs: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool | None = None

    def __post_init__(self) -> None:
        for name in ("socket_timeout", "socket_connect_timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a positive number of seconds or None")
        if self.health_check_interval < 0 or self.retry_backoff_cap < 0:
            raise ConfigurationError("health_check_interval/retry_backoff_cap must be >= 0")
        if self.max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigurationError("max_connections must be >= 1 or None")
        if self.sentinel_kwargs is not None and not isinstance(self.sentinel_kwargs, dict):
            raise ConfigurationError("sentinel_kwargs must be a dict (a keyword option only)")
        if self.ssl_cert_reqs is not None:
            _cert_reqs(self.ssl_cert_reqs)


@dataclass(frozen=True)
class RedisBrokerOptions(RedisConnectionOptions):
    """Options of :class:`RedisBroker` (seconds as float); connection settings inherited.

    Attributes:
        lease_seconds: how long a delivery stays held without ``extend`` (> 0).
        poll_interval: the longest a blocked ``receive`` sleeps between two claims (> 0).
        reclaim_batch: most expired leases one claim restores per queue.
        promote_batch: most due delayed messages one claim promotes per queue.
        global_keyprefix: kombu's ``global_keyprefix``: prepended to every key, never to
            values.
        priority_steps: kombu's ``priority_steps`` (ascending, starting at 0, within 0-9).
        sep: kombu's ``sep`` between a queue name and its priority step.
    """

    lease_seconds: float = 60.0
    poll_interval: float = 0.1
    reclaim_batch: int = 100
    promote_batch: int = 500
    global_keyprefix: str = ""
    priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    sep: str = "\x06\x16"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lease_seconds", "poll_interval"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")
        if self.reclaim_batch < 1 or self.promote_batch < 1:
            raise ConfigurationError("reclaim_batch and promote_batch must be >= 1")
        steps = tuple(int(s) for s in self.priority_steps)
        if (
            not steps
            or steps[0] != 0
            or list(steps) != sorted(set(steps))
            or steps[-1] > _KOMBU_MAX_PRIORITY
        ):
            raise ConfigurationError(
                f"priority_steps must be ascending, start at 0 and stay within 0-9: {steps!r}"
            )
        object.__setattr__(self, "priority_steps", steps)
        if not self.sep:
            raise ConfigurationError("sep must not be empty")


def _cert_reqs(value: str) -> str:
    text = value.strip().lower()
    text = text.removeprefix("cert_")
    if text not in ("required", "optional", "none"):
        raise ConfigurationError(
            f"ssl_cert_reqs must be required, optional or none (or CERT_REQUIRED, ...): {value!r}"
        )
    return text


# =============================================================================== errors


#: Error replies (Redis's error code: the reply's first word) that a retry may outlive: a
#: server loading its data or busy in a script, a failover or cluster change under way,
#: memory or disk full, a script cache flushed by a restart, a transaction discarded for one
#: of these. Any other error reply is the request's own fault: the same request fails the
#: same way again (WRONGTYPE, ERR ..., CROSSSLOT, NOPERM).
TRANSIENT_REPLIES = frozenset(
    {
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "MISCONF",
        "CLUSTERDOWN",
        "NOSCRIPT",
        "EXECABORT",
    }
)


def reply_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply (``WRONGTYPE``, ``ERR``, ``BUSY``...): the code
    redis-py parsed (``status_code``) or else the reply's first word when it is one (an
    upper-case word); None when there is none. A code, never the message's wording."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isalpha() and first.isupper() else None


@contextlib.contextmanager
def redis_errors(what: str, url: str, *, reading: bool = False) -> Iterator[None]:
    """Translate redis-py's exceptions into conveyor's tree: the ONE place that does it.

    Transient (a retry may succeed): connection failures, a READONLY reply (a replica after
    a failover) and a server loading its data are :class:`ConnectionLost`; timeouts
    :class:`OperationTimeout`; the other error replies of :data:`TRANSIENT_REPLIES` and
    redis-py's own protocol errors :class:`OperationalError`. Not transient: refused
    credentials or ACL permissions, an argument redis-py refuses (``DataError``) and every
    other error reply (``WRONGTYPE``, ``ERR ...``: classified by :func:`reply_code`) are
    :class:`ConfigurationError`, or :class:`DecodeError` when ``reading`` (what is stored
    is not what the reader expects). Messages are masked; the cause is chained.
    """
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError, rexc.NoPermissionError) as exc:
        raise ConfigurationError(f"{what} on {mask_url(url)}: refused: {_text(exc)}") from exc
    except rexc.TimeoutError as exc:
        raise OperationTimeout(f"{what} on {mask_url(url)}: timed out: {_text(exc)}") from exc
    except (rexc.ConnectionError, rexc.ReadOnlyError, rexc.BusyLoadingError) as exc:
        raise ConnectionLost(f"{what} on {mask_url(url)}: {_text(exc)}") from exc
    except rexc.DataError as exc:  # redis-py refused an argument before sending anything
        raise ConfigurationError(
            f"{what} on {mask_url(url)}: redis-py refused an argument: {_text(exc)}"
        ) from exc
    except rexc.ResponseError as exc:
        code = reply_code(exc)
        if code in TRANSIENT_REPLIES:
            raise OperationalError(f"{what} on {mask_url(url)}: {_text(exc)}") from exc
        refused = DecodeError if reading else ConfigurationError
        raise refused(
            f"{what} on {mask_url(url)}: the server refused it ({code or 'error reply'}): "
            f"{_text(exc)}"
        ) from exc
    except rexc.RedisError as exc:  # protocol and pub/sub errors of redis-py itself
        raise OperationalError(f"{what} on {mask_url(url)}: {_text(exc)}") from exc


def _text(exc: BaseException) -> str:
    return mask_text(str(exc))


# =========================================================================== connections


@dataclass(frozen=True)
class _Target:
    """Where a URL points, without secrets in ``repr``."""

    scheme: str
    db: int
    kwargs: Mapping[str, Any] = field(repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()


def _db_from_path(path: str, url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidURL(f"bad database {text!r} in {mask_url(url)!r}: a number, e.g. /0")
    return int(text)


def parse_redis_url(url: str) -> tuple[_Target, dict[str, str]]:
    """Parse any of the four schemes; return the target and the query (option) keys.

    Raises:
        InvalidURL: malformed URL, bad database number, several hosts outside Sentinel.
    """
    scheme = scheme_of(url)
    if scheme not in _SCHEMES:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a Redis URL (redis://, rediss://, redis+socket://, "
            "sentinel://)"
        )
    if scheme == "sentinel":
        parts = [
            parse_url(p, default_host="localhost", default_port=26379)
            for p in split_alternates(url)
        ]
        hosts: list[tuple[str, int]] = []
        for part in parts:
            if part.scheme != "sentinel":
                raise InvalidURL(f"mixed schemes in {mask_url(url)!r}")
            hosts.extend((h, p or 26379) for h, p in part.hosts)
        first = parts[0]
        query: dict[str, str] = {}
        for part in parts:
            query.update(part.query)
        auth = _credentials(next((p for p in parts if p.password is not None), first))
        db = _db_from_path(next((p.path for p in parts if p.path.strip("/")), ""), url)
        return _Target("sentinel", db, auth, tuple(hosts)), query
    parsed = parse_url(url, default_host="localhost", default_port=6379)
    query = dict(parsed.query)
    kwargs: dict[str, Any] = _credentials(parsed)
    if scheme == "redis+socket":
        path = "/" + parsed.path.lstrip("/") if parsed.path else ""
        if parsed.hosts and parsed.hosts[0][0] not in ("", "localhost"):
            path = "/" + "/".join(filter(None, (parsed.hosts[0][0], parsed.path)))
        if not path.strip("/"):
            raise InvalidURL(f"{mask_url(url)!r} names no socket path")
        kwargs["unix_socket_path"] = path
        vhost = query.pop("virtual_host", "0") or "0"
        return _Target(scheme, _db_from_path(vhost, url), kwargs), query
    if len(parsed.hosts) != 1:
        raise InvalidURL(f"{mask_url(url)!r}: one host per redis:// URL (use sentinel://)")
    host, port = parsed.hosts[0]
    kwargs["host"], kwargs["port"] = host, port or 6379
    return _Target(scheme, _db_from_path(parsed.path, url), kwargs), query


def _credentials(parsed: ParsedURL) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if parsed.username:
        out["username"] = parsed.username
    if parsed.password is not None:
        out["password"] = parsed.password
    return out


def connect(target: _Target, opts: RedisConnectionOptions, url: str) -> redis.Redis:
    """A redis-py client (with its own pool) for ``target``; connects lazily.

    Commands hitting connection errors, timeouts, READONLY (a demoted master) or LOADING are
    retried ``max_retries`` times with jittered exponential backoff, reconnecting each time;
    with Sentinel every reconnect asks the sentinels for the current master.

    Raises:
        ConfigurationError: TLS keys on a non-TLS URL, Sentinel without ``master_name``.
    """
    ssl_given = {k: getattr(opts, k) for k in _SSL_KEYS if getattr(opts, k) is not None}
    if ssl_given and target.scheme != "rediss":
        raise ConfigurationError(
            f"{', '.join(sorted(ssl_given))} given for {mask_url(url)!r}: TLS options need "
            "a rediss:// URL"
        )
    retry = Retry(
        ExponentialWithJitterBackoff(cap=opts.retry_backoff_cap, base=0.05),
        opts.max_retries,
        supported_errors=(
            rexc.ConnectionError,
            rexc.TimeoutError,
            TimeoutError,
            rexc.ReadOnlyError,
            rexc.BusyLoadingError,
        ),
    )
    kwargs: dict[str, Any] = dict(target.kwargs)
    kwargs.update(
        db=target.db,
        socket_timeout=opts.socket_timeout,
        socket_connect_timeout=opts.socket_connect_timeout,
        socket_keepalive=opts.socket_keepalive,
        health_check_interval=opts.health_check_interval,
        retry=retry,
        retry_on_error=[rexc.ReadOnlyError, rexc.BusyLoadingError],
        client_name=opts.client_name,
    )
    if opts.max_connections is not None:
        kwargs["max_connections"] = opts.max_connections
    if target.scheme == "rediss":
        kwargs["ssl"] = True
        kwargs["ssl_cert_reqs"] = _cert_reqs(opts.ssl_cert_reqs or "required")
        for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"):
            if getattr(opts, key) is not None:
                kwargs[key] = getattr(opts, key)
    if target.scheme == "sentinel":
        if not opts.master_name:
            raise ConfigurationError(
                f"{mask_url(url)!r}: sentinel:// needs the option master_name (Celery: "
                "broker_transport_options={'master_name': ...})"
            )
        from redis.sentinel import Sentinel

        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": opts.socket_connect_timeout,
            "socket_connect_timeout": opts.socket_connect_timeout,
        }
        if opts.sentinel_username:
            sentinel_kwargs["username"] = opts.sentinel_username
        if opts.sentinel_password is not None:
            sentinel_kwargs["password"] = opts.sentinel_password
        sentinel_kwargs.update(opts.sentinel_kwargs or {})
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            opts.master_name, **kwargs
        )
        return client
    return redis.Redis(**kwargs)


# ============================================================================= scripts

_SCRIPT_NAMES = ("publish", "push", "claim", "extend", "settle", "purge")


def _script_text(name: str) -> str:
    lua = resources.files("conveyor.transports").joinpath("lua")
    common = lua.joinpath("common.lua").read_text("utf-8")
    return common + "\n" + lua.joinpath(f"{name}.lua").read_text("utf-8")


class _Scripts:
    """The Lua scripts, known by SHA1 (loaded again after NOSCRIPT, e.g. when a restarted
    server or a new master has an empty script cache)."""

    def __init__(self, client: redis.Redis) -> None:
        self.publish = Script(client, _script_text("publish"))
        self.push = Script(client, _script_text("push"))
        self.claim = Script(client, _script_text("claim"))
        self.extend = Script(client, _script_text("extend"))
        self.settle = Script(client, _script_text("settle"))
        self.purge = Script(client, _script_text("purge"))


# ============================================================================ envelopes

_kombu_dumps: Callable[[Any], str] = kombu_json_text
_kombu_loads: Callable[[bytes], Any] = kombu_json_load


def _derived_id(headers: Mapping[str, Any], correlation_id: str | None) -> str | None:
    """The id a reader derives without ``message_id``: Celery's ``headers.id``, else the
    correlation id."""
    hid = headers.get("id")
    return hid if isinstance(hid, str) and hid else correlation_id


def encode_envelope(envelope: Envelope, queue: str, kombu_priority: int) -> str:
    """kombu's Redis JSON envelope for ``envelope`` published to ``queue``.

    Property order and values are what Celery 5.7 writes; ``message_id`` (an AMQP property
    kombu passes through) is added only when the envelope's id is not Celery's ``headers.id``
    / correlation id, so Celery's own messages are unchanged.
    """
    properties: dict[str, Any] = {}
    if envelope.correlation_id is not None:
        properties["correlation_id"] = envelope.correlation_id
    if envelope.reply_to is not None:
        properties["reply_to"] = envelope.reply_to
    properties["delivery_mode"] = 2
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    properties["priority"] = kombu_priority
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = str(uuid.uuid4())
    headers = dict(envelope.headers)
    if envelope.id != _derived_id(headers, envelope.correlation_id):
        properties["message_id"] = envelope.id
    return _kombu_dumps(
        {
            "body": base64.b64encode(envelope.body).decode("ascii"),
            "content-encoding": envelope.content_encoding,
            "content-type": envelope.content_type,
            "headers": headers,
            "properties": properties,
        }
    )


def decode_envelope(raw: bytes | str) -> tuple[Envelope, bool, int | None]:
    """Parse a kombu Redis envelope: ``(envelope, redelivered, delivery_count)``.

    kombu's ``priority`` ``k`` becomes conveyor priority ``9 - k`` (module docstring,
    "Priorities"). The redelivery headers are removed from the envelope.

    Raises:
        DecodeError: whatever is wrong with it (never another exception): not JSON, not a map,
            headers that are not a map or come after another object (the redelivery marks
            could not be placed, so its deliveries could not be counted), a priority that is
            not a number (``Infinity``), a body that is not valid base64, fields of the wrong
            type.
    """
    try:
        return _decode_envelope(raw)
    except DecodeError:
        raise
    except Exception as exc:  # any shape of bad input is a DecodeError, never a crash
        raise DecodeError(f"malformed kombu envelope: {type(exc).__name__}: {exc}") from exc


def _decode_envelope(raw: bytes | str) -> tuple[Envelope, bool, int | None]:
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
    try:
        msg = _kombu_loads(data)
    except Exception as exc:
        if data.startswith(_AMBIGUOUS):  # the Lua scripts' mark (common.lua)
            raise DecodeError("envelope has more than one headers member") from exc
        raise DecodeError(f"not a kombu JSON envelope: {exc}") from exc
    if not isinstance(msg, dict):
        raise DecodeError("a kombu envelope must be a JSON object")
    # The Lua scripts mark a redelivery inside the FIRST object member named "headers" in the
    # text (common.lua); with only scalars before the top-level "headers", that is the
    # top-level one. kombu always writes it so; anything else could never be counted.
    for key, value in msg.items():
        if key == "headers":
            break
        if isinstance(value, dict | list):
            raise DecodeError(f"envelope member {key!r} comes before its headers")
    headers = msg.get("headers")
    props = msg.get("properties")
    if props is None:
        props = {}
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise DecodeError("envelope headers and properties must be objects")
    headers = dict(headers)
    redelivered = bool(headers.pop(_REDELIVERED, False))
    prior = headers.pop(_COUNT, None)
    if prior is not None and _key_marks(raw, _COUNT_KEY) != 1:
        # A header of the sender's own under the name of the count would shadow conveyor's
        # mark (JSON keeps the last duplicate) and freeze the count: never trust it.
        raise DecodeError(f"envelope carries its own {_COUNT!r} header")
    info = props.get("delivery_info")
    if isinstance(info, dict) and info.get("redelivered"):
        redelivered = True
    body: Any = msg.get("body", "")
    try:
        if props.get("body_encoding") == "base64":
            data = base64.b64decode(body, validate=True) if body else b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            raise TypeError(f"body is a JSON {type(body).__name__}")
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"envelope body is not valid: {exc}") from exc
    raw_priority = props.get("priority")
    try:
        kombu_priority = int(raw_priority) if raw_priority is not None else 0
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"envelope priority {raw_priority!r:.40} is not an integer") from exc
    kombu_priority = min(max(kombu_priority, 0), _KOMBU_MAX_PRIORITY)
    correlation_id = props.get("correlation_id")
    if correlation_id is not None and type(correlation_id) is not str:
        correlation_id = _optional_text(props, "correlation_id")
    reply_to = props.get("reply_to")
    if reply_to is not None and type(reply_to) is not str:
        reply_to = _optional_text(props, "reply_to")
    content_type = msg.get("content-type") or "application/data"
    content_encoding = msg.get("content-encoding") or "binary"
    if not isinstance(content_type, str) or not isinstance(content_encoding, str):
        raise DecodeError("envelope content-type and content-encoding must be strings")
    message_id = props.get("message_id")
    env_id = (
        message_id
        if isinstance(message_id, str)
        else (_derived_id(headers, correlation_id) or str(props.get("delivery_tag") or ""))
    )
    envelope = Envelope(
        id=env_id,
        body=data,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        priority=_KOMBU_MAX_PRIORITY - kombu_priority,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )
    if not redelivered:
        count: int | None = 1
    elif isinstance(prior, int) and not isinstance(prior, bool):
        count = prior + 1
    else:
        count = None  # restored by kombu: it does not count
    return envelope, redelivered, count


def _optional_text(props: Mapping[str, Any], key: str) -> str | None:
    value = props.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a number some client wrote for an id: still one
    raise DecodeError(f"envelope property {key!r} must be a string")


def _key_marks(raw: bytes | str, key: bytes) -> int:
    """How often ``key`` (a quoted JSON string) occurs as a member name: followed by a colon
    (a string value never is, and a quote inside a string is escaped). Slow path only."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    return len(re.findall(re.escape(key) + rb"[ \t\r\n]*:", data))


def undecodable_stand_in(raw: bytes | str, queue: str, reason: str) -> str:
    """The well-formed envelope dead-lettered in place of an undecodable one (``_common``):
    its body is the original text, its id the original's where one can be read."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    ident = ""
    with contextlib.suppress(Exception):
        msg = _kombu_loads(data)
        if isinstance(msg, dict):
            props, headers = msg.get("properties"), msg.get("headers")
            for candidate in (
                props.get("message_id") if isinstance(props, dict) else None,
                headers.get("id") if isinstance(headers, dict) else None,
                props.get("correlation_id") if isinstance(props, dict) else None,
            ):
                if isinstance(candidate, str) and candidate and len(candidate) <= 255:
                    ident = candidate
                    break
    envelope = Envelope(
        id=clean_text(ident, 255) if ident else hashlib.sha256(data).hexdigest()[:32],
        body=data,
        content_type=UNDECODABLE_CONTENT_TYPE,
        content_encoding="binary",
        headers={DEAD_LETTER_REASON_HEADER: reason, DEAD_LETTER_SOURCE_HEADER: queue},
    )
    return encode_envelope(envelope, queue + DEAD_LETTER_SUFFIX, _KOMBU_MAX_PRIORITY)


# =============================================================================== broker


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``Delivery.receipt`` holds: the queue and the lease id (``<owner>:<call>:<n>``)."""

    queue: str
    lease: str


class _Keys:
    """Key names for one prefix / separator / step configuration."""

    def __init__(self, prefix: str, sep: str, steps: Sequence[int]) -> None:
        self.prefix = prefix
        self.sep = sep
        self.steps = tuple(steps)

    def ready(self, queue: str) -> list[str]:
        """kombu's priority lists of ``queue``, in service order."""
        p = self.prefix
        return [f"{p}{queue}" if s == 0 else f"{p}{queue}{self.sep}{s}" for s in self.steps]

    def own(self, queue: str, kind: str) -> str:
        return f"{self.prefix}conveyor:{{{queue}}}:{kind}"

    def binding(self, queue: str) -> tuple[str, str]:
        """kombu's binding set key and member for the direct exchange named ``queue``."""
        return f"{self.prefix}_kombu.binding.{queue}", f"{queue}{self.sep}{self.sep}{queue}"


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
        self._scripts = _Scripts(client)
        # publish, claim, ack, settle and extend: raw commands on a connection per thread.
        self._cmd = HeldConnections(client)
        opts = self.options
        self._keys = _Keys(opts.global_keyprefix, opts.sep, opts.priority_steps)
        self._steps_argv = [str(s) for s in opts.priority_steps]
        self._ready_cache: dict[str, list[str]] = {}
        self._token = uuid.uuid4().hex[:12]
        self._calls = itertools.count(1)
        self._rotation = itertools.count()
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # lease id -> queue
        self._settled: OrderedDict[str, None] = OrderedDict()
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
        with redis_errors(what, self.url):
            return fn(*args)

    def _bucket(self, priority: int) -> int:
        """1-based position of the ready list for conveyor priority ``priority``."""
        kombu_priority = _KOMBU_MAX_PRIORITY - priority
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

    def dead_letter_queue(self, queue: str) -> str:
        """``queue + ".dead"``: an ordinary queue in the same layout."""
        return validate_queue_name(queue) + DEAD_LETTER_SUFFIX

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
                kp = _KOMBU_MAX_PRIORITY - envelope.priority
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
                    encode_envelope(envelope, queue, _KOMBU_MAX_PRIORITY - envelope.priority)
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
        names = self._queue_list(queues)
        if max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages}")
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
        with self._lock:
            for d in deliveries:
                self._held[d.receipt.lease] = d.queue
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
        with self._lock:
            return receipt.lease in self._settled

    def _mark_settled(self, receipt: _Receipt) -> None:
        with self._lock:
            self._held.pop(receipt.lease, None)
            self._settled[receipt.lease] = None
            while len(self._settled) > _SETTLED_MEMORY:
                self._settled.popitem(last=False)

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
            held = dict(self._held)
            self._held.clear()
        by_queue: dict[str, list[str]] = {}
        for lease, queue in held.items():
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

"""Memcached result backend on pymemcache, in Celery's key and value format.

Capabilities:
    ``native_ttl`` (memcached's own expiry time on every item), ``counters`` (``incr`` on
    memcached's atomic ``incr``, created with ``add`` when missing; ``add_member`` as a
    ``gets``/``cas`` loop on a JSON list), ``groups``, ``multi_reader``, ``cross_process``.
    Deliberately NOT ``durable``: memcached evicts items under memory pressure (least
    recently used first) and forgets everything on restart, so a result may vanish before its
    TTL (the reader then sees PENDING). Not ``wait``: memcached has no notifications; readers
    poll (:func:`conveyor.core.wait_for`). Not ``expiry_sweep``: nothing to sweep.

URL:
    ``cache+memcached://host:port[;host2:port2...]/`` (Celery's spelling) or
    ``memcached://host:port[;host2:port2]/``; hosts may also be separated by ``,``; the port
    defaults to 11211; IPv6 hosts in brackets. The query string carries options
    (``cache+memcached://h1:11211;h2:11211/?default_ttl=3600``). Memcached's text protocol
    has no authentication: a URL with a password is refused.

Options (keyword > URL query > default; :class:`MemcachedResultBackendOptions`):
    ``default_ttl`` (86400.0: Celery's ``result_expires``), ``serializer`` (``json``),
    ``accept`` (serializers ``fetch`` decodes; default: the serializer alone),
    ``accept_compression`` (methods a Celery 5.7 compressed payload may use; default: every
    built-in one; decompression stops at 64 MiB),
    ``global_keyprefix`` (Celery's ``result_backend_transport_options['global_keyprefix']``,
    with Celery's rule: an ``_`` is appended unless it ends in ``:``, ``_``, ``-`` or ``.``),
    ``connect_timeout`` (5.0) and ``timeout`` (5.0: each socket operation), ``max_pool_size``
    (connections per server and client; None: unbounded), ``contention_timeout`` (10.0: how
    long a ``store``/``add_member`` keeps retrying a compare-and-set that other writers keep
    winning before :class:`OperationTimeout`).

Thread-safety:
    One instance may be shared by the threads of one process: each server has a
    thread-safe connection pool (pymemcache ``PooledClient``). Build a new instance after
    ``fork()``.

Servers and keys:
    Keys are spread over the servers by pymemcache's ``HashClient`` (rendezvous hashing on
    ``host:port``), exactly as Celery 5.7's cache backend spreads them, so both find each
    other's results on the same server list. A server that fails is NOT taken out of the
    ring (pymemcache's default would silently move its keys to other servers and answer
    "not found" meanwhile): its keys raise :class:`ConnectionLost` until it is back.

Celery compatibility (``docs/celery-compat.md#memcached-keys``):

* Keys ``celery-task-meta-<task_id>`` and ``celery-taskset-meta-<group_id>``; values are the
  result meta encoded with the result serializer, ``task_id`` included (JSON text), flags 0.
  Readers decode the bytes whatever the flags (python-memcached stored flag 16).
* Groups: ``{"result": [[group_id, null], [[[task_id, null], null], ...]], "date_done": ...}``
  -- Celery's saved-group document plus a ``date_done`` key it ignores.
* A stored SUCCESS is never replaced: ``gets`` then ``cas`` (or ``add`` when missing), so the
  check and the write are one atomic step on the server (Celery checks and writes in two).
* Expiry: memcached reads an expiry time above 30 days (2592000 s) as an absolute Unix time;
  such TTLs are converted to one (Celery warns and lets results expire at once). Memcached
  counts whole seconds and its clock ticks once a second, so an item stored with expiry
  ``n`` may vanish up to a second early: TTLs are rounded up and one second is added, so an
  entry lives at least ``ttl`` and at most ``ttl + 2`` seconds.
* Counters and sets use keys ``conveyor-counter-<key>`` (never a result key).

Ids:
    Task ids, group ids, group members and counter keys follow the rules of
    :meth:`~conveyor.core.base.ResultBackendBase.validate_task_id` (a non-empty ``str``, no
    NUL, valid UTF-8, at most 1024 bytes), and must also make memcached keys as Celery's
    client sends them: printable ASCII without spaces (memcached refuses white space and
    control characters; pymemcache, Celery's client, refuses non-ASCII keys), and at most
    230 characters minus ``global_keyprefix`` (the longest key, ``<prefix>celery-taskset-
    meta-<id>``, is at most 250 bytes; one length for every kind of id). Any other id raises
    ``ConfigurationError`` saying which rule it breaks, on every method, before any server
    is asked, so ``validate_task_id`` refuses it at publish time. Refusing rather than
    encoding such ids (e.g. hashing them) keeps one key layout, Celery's: the ids refused are
    the ones Celery cannot store in memcached either (only the length rule is stricter, by
    the prefix of group keys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
)

from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase, check_default_ttl
from conveyor.core.capabilities import Capability
from conveyor.core.celery import (
    celery_key_prefix,
    decode_meta,
    decode_payload,
    encode_meta,
    group_from_meta,
    group_meta,
)
from conveyor.core.compression import (
    BUILTIN_METHODS,
    DEFAULT_MAX_SIZE,
)
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    EncodeError,
    InvalidURL,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import build_options
from conveyor.core.serializers import SerializerRegistry
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.core.urls import mask_text, mask_url, parse_url, scheme_of

__all__ = [
    "MAX_RELATIVE_EXPIRY",
    "MemcachedResultBackend",
    "MemcachedResultBackendOptions",
    "exptime",
    "translate_error",
]

#: Memcached reads an expiry above this many seconds (30 days) as an absolute Unix time.
MAX_RELATIVE_EXPIRY = 30 * 24 * 60 * 60

_SCHEMES = ("cache+memcached", "memcached")
_DEFAULT_PORT = 11211
_TASK_PREFIX = "celery-task-meta-"
_GROUP_PREFIX = "celery-taskset-meta-"
_COUNTER_PREFIX = "conveyor-counter-"
_MAX_KEY_BYTES = 250
#: The longest global_keyprefix that leaves room for a 36-character id in every key.
_MAX_PREFIX = _MAX_KEY_BYTES - len(_GROUP_PREFIX) - 36
_FETCH_CHUNK = 500
_UTC = timezone.utc
_SUCCESS = State.SUCCESS.value


def exptime(ttl: float | None, *, now: float | None = None) -> int:
    """Memcached's expiry time for an entry that must live at least ``ttl`` seconds.

    ``None`` -> 0 (never expires). Otherwise ``ceil(ttl) + 1`` seconds (memcached's clock
    ticks once a second, so an item may otherwise expire up to a second early); above 30
    days, the absolute Unix time ``ceil(now + ttl) + 1`` instead, because memcached reads
    such values as timestamps.
    """
    if ttl is None:
        return 0
    relative = math.ceil(ttl) + 1
    if relative <= MAX_RELATIVE_EXPIRY:
        return relative
    clock = time.time() if now is None else now
    return math.ceil(clock + ttl) + 1


def translate_error(exc: BaseException, *, what: str, url: str) -> ConveyorError:
    """The ONE mapping from pymemcache and socket errors to conveyor's tree.

    * socket timeouts -> :class:`OperationTimeout`;
    * refused/reset connections, unexpected closes, "all servers down" (pymemcache raises
      the bare :class:`MemcacheError` for that alone) -> ConnectionLost;
    * illegal keys (spaces, control characters, over 250 bytes) -> ConfigurationError;
    * the server's ``CLIENT_ERROR`` replies (a malformed request; retrying sends the same)
      and unknown commands -> ConfigurationError;
    * ``SERVER_ERROR`` replies (out of memory, ...) -> :class:`OperationalError`; a value
      over the item size limit is told apart by asking the server its limit, not by reading
      the reply (see ``MemcachedResultBackend._driver``): :class:`EncodeError`.

    Classified by exception class, never by message text.
    """
    where = f"{what} on {mask_url(url)}"
    detail = mask_text((str(exc).strip().splitlines() or [""])[0][:300]) or type(exc).__name__
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias since 3.10
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, MemcacheUnexpectedCloseError | OSError):
        return ConnectionLost(f"{where}: connection lost: {detail}")
    if isinstance(exc, MemcacheIllegalInputError):
        return ConfigurationError(f"{where}: not a valid memcached key or value: {detail}")
    if type(exc) is MemcacheError:  # HashClient: no server left to ask
        return ConnectionLost(f"{where}: {detail}")
    if isinstance(exc, MemcacheClientError | MemcacheUnknownCommandError):
        return ConfigurationError(f"{where}: the server refused the request: {detail}")
    return OperationalError(f"{where}: {detail}")


#: Bytes an item takes besides its value (header, CAS, the longest key): a value within this
#: of the item size limit does not fit.
_ITEM_OVERHEAD = 64 + _MAX_KEY_BYTES


class _Sent:
    """What a write sent, for the error path of ``_driver``."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = 0


def _parse_servers(url: str) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """``cache+memcached://h1:11211;h2/?x=1`` -> ``([("h1", 11211), ("h2", 11211)], {x: 1})``."""
    scheme = scheme_of(url)
    if scheme not in _SCHEMES:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a memcached URL: use "
            "'cache+memcached://host:11211/' or 'memcached://host1:11211;host2:11211/'"
        )
    rest = url.strip()[len(scheme) + 3 :]
    location, _, query_text = rest.partition("?")
    servers: list[tuple[str, int]] = []
    query: dict[str, str] = {}
    for index, item in enumerate(location.replace(",", ";").split(";"), 1):
        item = item.strip().rstrip("/")
        if not item:
            continue
        if "/" in item:  # the item itself is not shown: it may hold credentials
            raise InvalidURL(f"{mask_url(url)!r}: memcached URLs have no path")
        try:
            parsed = parse_url(f"memcached://{item}/", default_port=_DEFAULT_PORT)
        except InvalidURL:  # its text quotes the item, which may be part of a password
            raise InvalidURL(
                f"{mask_url(url)!r}: server {index} is not host[:port] (a port is a number 1-65535)"
            ) from None
        if parsed.password is not None or parsed.username is not None:
            raise ConfigurationError(
                f"{mask_url(url)!r}: memcached's text protocol has no authentication; "
                "remove the credentials from the URL"
            )
        for host, port in parsed.hosts:
            servers.append((host, port or _DEFAULT_PORT))
    if not servers:
        raise InvalidURL(
            f"{mask_url(url)!r} names no memcached server: use 'cache+memcached://host:11211/'"
        )
    if query_text:
        query = dict(parse_url(f"memcached://h/?{query_text}").query)
    return list(dict.fromkeys(servers)), query


@dataclass(frozen=True)
class MemcachedResultBackendOptions:
    """Options of :class:`MemcachedResultBackend` (seconds as float).

    Attributes:
        default_ttl: lifetime of a record, group or counter stored with ``ttl=None``.
            ``None``/0: no expiry (memcached may still evict); explicit configuration only.
        serializer: result serializer name (Celery's ``result_serializer``).
        accept: serializers ``fetch`` may decode; empty means ``(serializer,)``.
        accept_compression: compression methods a Celery 5.7 compressed payload may use
            when read (the app's ``accept_compression``); None or empty: none.
        global_keyprefix: prefix of every key (Celery's rule, see the module docstring).
        connect_timeout: seconds to connect to a server.
        timeout: seconds for each socket read or write.
        max_pool_size: connections per server in this client; None: unbounded.
        contention_timeout: seconds a compare-and-set loop may retry before giving up.
    """

    default_ttl: float | None = DEFAULT_RESULT_TTL
    serializer: str = "json"
    accept: tuple[str, ...] = ()
    accept_compression: tuple[str, ...] | None = BUILTIN_METHODS
    global_keyprefix: str = ""
    connect_timeout: float = 5.0
    timeout: float = 5.0
    max_pool_size: int | None = None
    contention_timeout: float = 10.0

    def __post_init__(self) -> None:
        check_default_ttl(self.default_ttl)
        for name in ("connect_timeout", "timeout", "contention_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int | float) and value > 0 and math.isfinite(value)
            ):
                raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")
        if self.max_pool_size is not None and self.max_pool_size < 1:
            raise ConfigurationError(f"max_pool_size must be >= 1: {self.max_pool_size!r}")
        if not _plain(self.global_keyprefix):
            raise ConfigurationError(
                "global_keyprefix must be printable ASCII without spaces (a memcached key)"
            )
        if len(celery_key_prefix(self.global_keyprefix)) > _MAX_PREFIX:
            raise ConfigurationError(
                f"global_keyprefix is longer than {_MAX_PREFIX - 1} characters: keys are at "
                f"most {_MAX_KEY_BYTES} bytes"
            )


def _plain(text: str) -> bool:
    """True if ``text`` may be part of a memcached key as it is, for every client: printable
    ASCII, no space (memcached refuses white space and control characters; pymemcache,
    Celery's client, refuses non-ASCII)."""
    return text.isascii() and all(32 < ord(c) < 127 for c in text)


def _brief(name: str) -> str:
    """An id as error messages show it: its ``repr``, cut short."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


class MemcachedResultBackend(ResultBackendBase):
    """Result backend on one or more memcached servers; see the module docstring.

    Args:
        servers: ``(host, port)`` pairs.
        options: :class:`MemcachedResultBackendOptions`; defaults when None.
        serializers: the serializer registry (default: the process-wide one).
        url: the URL shown (masked) in ``repr`` and errors.
        client: a ready pymemcache client to use instead of building one (tests); it must
            not serialize values (no ``serde``). Closed by ``close`` all the same.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.NATIVE_TTL,
            Capability.COUNTERS,
            Capability.GROUPS,
            Capability.MULTI_READER,
            Capability.CROSS_PROCESS,
            Capability.COMPRESSED_RESULTS,
        }
    )

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        options: MemcachedResultBackendOptions | None = None,
        *,
        serializers: SerializerRegistry | None = None,
        url: str | None = None,
        client: Any = None,
    ) -> None:
        self.options = opts = options or MemcachedResultBackendOptions()
        if not servers:
            raise ConfigurationError("a memcached result backend needs at least one server")
        self.servers = tuple(servers)
        self.url = url or "cache+memcached://" + ";".join(f"{h}:{p}" for h, p in self.servers) + "/"
        self._set_up_results(opts, serializers)
        prefix = celery_key_prefix(opts.global_keyprefix)
        self._task_prefix = prefix + _TASK_PREFIX
        self._group_prefix = prefix + _GROUP_PREFIX
        self._counter_prefix = prefix + _COUNTER_PREFIX

        self._client: Any = client if client is not None else self._make_client()
        self._item_limit: int | None = None
        self._closed = False

    def _make_client(self) -> HashClient:
        opts = self.options
        # Keys stay on their server when it fails (no re-hashing to the others) and every
        # failure raises: retry_timeout < 0 makes pymemcache try the server again at once
        # instead of answering with a default value, and the huge retry_attempts keeps it
        # from ever dropping the server from the ring.
        return HashClient(
            list(self.servers),
            connect_timeout=opts.connect_timeout,
            timeout=opts.timeout,
            no_delay=True,
            use_pooling=True,
            max_pool_size=opts.max_pool_size,
            retry_attempts=2**62,
            retry_timeout=-1,
            ignore_exc=False,
            default_noreply=False,
            allow_unicode_keys=False,
        )

    @classmethod
    def from_url(
        cls, url: str, *, serializers: SerializerRegistry | None = None, **options: Any
    ) -> MemcachedResultBackend:
        """Build a backend from ``url``. Does not connect (the first operation does).

        Raises:
            InvalidURL: not a memcached URL, bad host or port, no server.
            ConfigurationError: unknown option, bad value, credentials in the URL.
        """
        servers, query = _parse_servers(url)
        opts = build_options(
            MemcachedResultBackendOptions, query, options, owner="memcached result backend"
        )
        return cls(servers, opts, serializers=serializers, url=url)

    # ------------------------------------------------------------------ driver boundary
    @contextlib.contextmanager
    def _driver(self, what: str) -> Iterator[_Sent]:
        """Every client call runs in here: closed check and error translation. Callers that
        write set ``sent.size`` (bytes of the value): a ``SERVER_ERROR`` for a value over
        the servers' item size limit is then an :class:`EncodeError`, not transient."""
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")
        sent = _Sent()
        try:
            yield sent
        except (MemcacheError, OSError) as exc:
            if self._closed:
                raise ConnectionLost(f"{self!r} is closed") from exc
            if isinstance(exc, MemcacheServerError) and sent.size:
                limit = self._item_size_limit()
                if limit is not None and sent.size + _ITEM_OVERHEAD > limit:
                    raise EncodeError(
                        f"{what} on {mask_url(self.url)}: a value of {sent.size} bytes is over "
                        f"the server's item size limit ({limit} bytes, memcached -I)"
                    ) from exc
            raise translate_error(exc, what=what, url=self.url) from exc

    def _item_size_limit(self) -> int | None:
        """The smallest ``item_size_max`` of the servers (``stats settings``), asked once,
        on the first ``SERVER_ERROR`` of a write; None when it cannot be known."""
        if self._item_limit is None:
            clients = getattr(self._client, "clients", None)
            limits: list[int] = []
            try:
                for client in (clients or {}).values():
                    value = client.stats("settings").get(b"item_size_max")
                    if isinstance(value, int | bytes | str):
                        limits.append(int(value))
            except Exception:  # the server is gone meanwhile: the error stays transient
                return None
            self._item_limit = min(limits) if limits else None
        return self._item_limit

    def _check_id(self, value: object, what: str) -> str:
        """The base rules, then memcached's (see Ids in the module docstring). One rule for
        every kind of id: the longest key prefix (a group's) decides the length."""
        name = super()._check_id(value, what)
        if not _plain(name):
            bad = next(c for c in name if not 32 < ord(c) < 127)
            raise ConfigurationError(
                f"{what} {_brief(name)} cannot be part of a memcached key: it contains "
                f"{bad!r}, and memcached keys are printable ASCII without spaces or control "
                "characters"
            )
        if len(self._group_prefix) + len(name) > _MAX_KEY_BYTES:
            raise ConfigurationError(
                f"{what} {_brief(name)} is {len(name)} characters long; with the key prefix "
                f"{self._group_prefix!r} memcached keys allow "
                f"{_MAX_KEY_BYTES - len(self._group_prefix)}"
            )
        return name

    def _key(self, prefix: str, name: str, what: str) -> str:
        """The memcached key of id ``name`` (checked: ``ConfigurationError`` saying why
        there is none)."""
        return prefix + self._check_id(name, what)

    def _exptime(self, ttl: float | None) -> int:
        seconds = self._ttl(ttl)
        if seconds is None or math.isinf(seconds):
            return 0
        return exptime(seconds)

    def _decode_record(self, raw: bytes, task_id: str) -> ResultRecord:
        return decode_meta(
            raw,
            self._serializer.content_type,
            accept=self._accept,
            serializers=self._serializers,
            task_id=task_id,
            max_size=DEFAULT_MAX_SIZE,
            accept_compression=self._accept_compression,
        )

    def _decode_value(self, raw: bytes) -> Any:
        """A stored payload's value (a Celery 5.7 compressed one too), bounded."""
        return decode_payload(
            raw,
            self._serializer.content_type,
            accept=self._accept,
            serializers=self._serializers,
            max_size=DEFAULT_MAX_SIZE,
            accept_compression=self._accept_compression,
        )

    def _is_success(self, raw: bytes) -> bool:
        try:
            meta = self._decode_value(raw)
        except ConveyorError:
            return False  # unreadable: not a SUCCESS we must keep
        return isinstance(meta, Mapping) and meta.get("status") == _SUCCESS

    def _pause(self, attempt: int, deadline: float, what: str) -> None:
        """Back off after a lost compare-and-set; give up past ``deadline``."""
        if time.monotonic() > deadline:
            raise OperationTimeout(
                f"{what} on {mask_url(self.url)}: other writers kept winning for "
                f"{self.options.contention_timeout} s"
            )
        if attempt >= 2:
            time.sleep(random.uniform(0, min(0.05, 0.001 * attempt)))

    # ------------------------------------------------------------------ ResultBackend
    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Save ``record``; a stored SUCCESS is kept (``gets`` + ``cas``/``add``: atomic).

        Raises:
            ConfigurationError: a refused task id (see ``validate_task_id``), bad ttl.
            EncodeError: the result cannot be serialized or exceeds the item size limit.
            OperationalError: a server could not be reached.
        """
        try:
            state = State(record.state)
        except ValueError:
            raise ConfigurationError(f"unknown task state {record.state!r}") from None
        if state is not record.state:
            record = dataclasses.replace(record, state=state)
        record = self._check_record(record)
        key = self._task_prefix + record.task_id
        value = encode_meta(record, self._serializer.name, self._serializers)
        expire = self._exptime(ttl)
        what = f"store result {_brief(record.task_id)}"
        deadline = time.monotonic() + self.options.contention_timeout
        with self._driver(what) as sent:
            sent.size = len(value)
            for attempt in itertools.count():
                current, token = self._client.gets(key)
                if current is None:
                    if self._client.add(key, value, expire=expire, noreply=False):
                        return
                elif self._is_success(current):
                    return  # a redelivered duplicate never replaces a finished result
                elif self._client.cas(key, value, token, expire=expire, noreply=False):
                    return
                self._pause(attempt, deadline, what)  # another writer got in between

    def fetch(self, task_id: str) -> ResultRecord | None:
        """Return the record for ``task_id``, or ``None`` if unknown, expired or evicted."""
        key = self._key(self._task_prefix, task_id, "task id")
        with self._driver(f"fetch result {_brief(task_id)}"):
            raw = self._client.get(key)
        return None if raw is None else self._decode_record(raw, task_id)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Return the records found for ``task_ids``: one multi-get per server and chunk."""
        wanted = list(dict.fromkeys(self._check_ids(task_ids)))
        found: dict[str, ResultRecord] = {}
        for start in range(0, len(wanted), _FETCH_CHUNK):
            chunk = wanted[start : start + _FETCH_CHUNK]
            keys = {self._key(self._task_prefix, t, "task id"): t for t in chunk}
            with self._driver(f"fetch {len(chunk)} results"):
                values = self._client.get_many(list(keys))
            for key, raw in values.items():
                name = key.decode("ascii") if isinstance(key, bytes) else key
                if raw is not None and name in keys:
                    found[keys[name]] = self._decode_record(raw, keys[name])
        return found

    def forget(self, task_id: str) -> None:
        """Delete the record for ``task_id``. Idempotent."""
        key = self._key(self._task_prefix, task_id, "task id")
        with self._driver(f"forget result {_brief(task_id)}"):
            self._client.delete(key, noreply=False)

    def close(self) -> None:
        """Close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._client.close()

    # ------------------------------------------------------------------ groups
    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Save the membership of ``record.group_id`` in Celery's saved-group format."""
        record = self._check_group(record)
        key = self._group_prefix + record.group_id
        meta = group_meta(record.group_id, record.task_ids)
        done = record.date_done or datetime.now(_UTC)
        if done.tzinfo is None:
            done = done.replace(tzinfo=_UTC)
        meta["date_done"] = done.astimezone(_UTC).isoformat()
        value, _, _ = self._serializers.encode(meta, self._serializer.name)
        with self._driver(f"store group {_brief(record.group_id)}") as sent:
            sent.size = len(value)
            self._client.set(key, value, expire=self._exptime(ttl), noreply=False)

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """Return the group or ``None`` if unknown, expired or evicted."""
        key = self._key(self._group_prefix, group_id, "group id")
        with self._driver(f"fetch group {_brief(group_id)}"):
            raw = self._client.get(key)
        if raw is None:
            return None
        return group_from_meta(self._decode_value(raw), group_id)

    def forget_group(self, group_id: str) -> None:
        """Delete the group record (not its members' results). Idempotent."""
        key = self._key(self._group_prefix, group_id, "group id")
        with self._driver(f"forget group {_brief(group_id)}"):
            self._client.delete(key, noreply=False)

    # ------------------------------------------------------------------ counters
    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to counter ``key`` (missing: 0); refresh its ttl.

        Non-negative amounts use memcached's atomic ``incr`` (created with ``add`` when
        missing; two creators race on ``add``, the loser increments). Negative amounts, and
        counters that went below zero (memcached counters are unsigned), use a ``gets``/
        ``cas`` loop on the decimal value. The ttl is refreshed with ``touch`` right after.

        Raises:
            ConfigurationError: ``amount`` not an int, bad key.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigurationError(f"amount must be an int, got {amount!r}")
        name = self._key(self._counter_prefix, key, "counter key")
        expire = self._exptime(ttl)
        what = f"incr {_brief(key)}"
        deadline = time.monotonic() + self.options.contention_timeout
        with self._driver(what):
            for attempt in itertools.count():
                if amount >= 0:
                    try:
                        value = self._client.incr(name, amount, noreply=False)
                    except MemcacheClientError:
                        value = self._incr_cas(name, amount, expire, what, deadline)
                        return value
                    if value is not None:
                        self._client.touch(name, expire=expire, noreply=False)
                        return int(value)
                    if self._client.add(name, str(amount), expire=expire, noreply=False):
                        return amount
                else:
                    return self._incr_cas(name, amount, expire, what, deadline)
                self._pause(attempt, deadline, what)  # created by someone else meanwhile
        raise AssertionError("unreachable")  # pragma: no cover

    def _incr_cas(self, name: str, amount: int, expire: int, what: str, deadline: float) -> int:
        for attempt in itertools.count():
            current, token = self._client.gets(name)
            if current is None:
                if self._client.add(name, str(amount), expire=expire, noreply=False):
                    return amount
            else:
                try:
                    value = int(current) + amount
                except ValueError:
                    raise DecodeError(f"{what}: key holds a non-counter value") from None
                if self._client.cas(name, str(value), token, expire=expire, noreply=False):
                    return value
            self._pause(attempt, deadline, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """Atomically add ``member`` to set ``key``; return its size. Idempotent per member.

        A ``gets``/``cas`` loop on a JSON list (the ttl is refreshed by the same ``cas``).
        The list must fit memcached's item size limit (1 MiB by default: roughly 25,000
        UUID members).

        Raises:
            ConfigurationError: bad key, ``member`` not a string.
        """
        name = self._key(self._counter_prefix, key, "counter key")
        member = self._check_id(member, "member")
        expire = self._exptime(ttl)
        what = f"add_member {_brief(key)}"
        deadline = time.monotonic() + self.options.contention_timeout
        with self._driver(what) as sent:
            for attempt in itertools.count():
                current, token = self._client.gets(name)
                if current is None:
                    fresh = json.dumps([member], ensure_ascii=False).encode("utf-8")
                    if self._client.add(name, fresh, expire=expire, noreply=False):
                        return 1
                else:
                    try:
                        members = json.loads(current)
                    except ValueError:
                        raise DecodeError(f"{what}: key holds a non-set value") from None
                    if not isinstance(members, list):
                        raise DecodeError(f"{what}: key holds a non-set value")
                    if member not in members:
                        members.append(member)
                    value = json.dumps(members, ensure_ascii=False).encode("utf-8")
                    sent.size = len(value)
                    if self._client.cas(name, value, token, expire=expire, noreply=False):
                        return len(members)
                self._pause(attempt, deadline, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def forget_key(self, key: str) -> None:
        """Delete counter or set ``key``. Idempotent."""
        name = self._key(self._counter_prefix, key, "counter key")
        with self._driver(f"forget key {_brief(key)}"):
            self._client.delete(name, noreply=False)

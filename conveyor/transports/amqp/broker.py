"""AMQP 0-9-1 broker for RabbitMQ on pika, wire-compatible with Celery 5 (``amqp://``).

Capabilities:
    :class:`AMQPBroker`: ``at_least_once`` (manual acks; a delivery is held until ``ack`` or
    ``reject``, and RabbitMQ redelivers it with ``redelivered=True`` when the holder's channel
    or connection goes away), ``lease_extension`` (a client-side lease, see below),
    ``delayed_delivery`` (held in RabbitMQ by TTL queues that dead-letter onward; no plugin),
    ``dead_letter`` (``<queue>.dead``), ``queue_size``, ``durable``, ``cross_process``.
    :class:`AMQPPriorityBroker` (chosen by :meth:`AMQPBroker.from_url` when ``max_priority``
    is set) adds ``priority``: queues are declared with ``x-max-priority``, which Celery
    must then declare identically (``task_queue_max_priority``). Two classes keep every
    class's capability set static and true: a queue without ``x-max-priority`` silently
    ignores priorities, so the plain class refuses them.

URL:
    ``amqp://user:password@host:5672/vhost`` (also ``pyamqp://``, Celery's alias; and
    ``amqps://`` for TLS, default port 5671). The vhost is the path as kombu reads it:
    ``amqp://host//`` and ``amqp://host/`` and ``amqp://host`` are vhost ``/``,
    ``amqp://host/%2F`` too, ``amqp://host/prod`` is ``prod``. Credentials default to
    ``guest``/``guest``. Failover: ``amqp://h1//;amqp://h2//`` (or ``amqp://h1,h2//``):
    each (re)connection tries the hosts in order. Query keys are the options below
    (``?heartbeat=30&ssl_ca_certs=/etc/ca.pem``); unknown keys are an error.

Options (keyword > URL query > default; :class:`AMQPBrokerOptions`):
    Connection (also for ``rpc://``, :class:`AMQPConnectionOptions`): ``heartbeat`` (60.0
    seconds, 0 disables), ``connect_timeout`` (10.0), ``operation_timeout`` (10.0: longest a
    call waits for RabbitMQ, including waiting for a reconnect), ``retry_interval`` (0.2) and
    ``max_retry_interval`` (2.0): reconnect backoff, ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile``, ``ssl_cert_reqs`` (``required``, ``optional``, ``none``; kombu's
    ``CERT_*`` spellings too), ``ssl_check_hostname`` (True), ``ssl_context`` (keyword only:
    a ready :class:`ssl.SSLContext`), ``connection_name``, ``max_message_size`` (128 MiB
    = 134217728 bytes, RabbitMQ's default ``max_message_size``: a bigger body is refused with
    ``EncodeError`` before it is sent).
    Broker: ``lease_seconds`` (60.0), ``prefetch_count`` (None: each consumer's prefetch is
    the ``max_messages`` of the ``receive`` that started it), ``max_priority`` (None; 1-255),
    ``queue_type`` (``classic`` or ``quorum``), ``dead_letter`` (``publish`` or ``dlx``),
    ``delivery_limit`` (quorum ``x-delivery-limit``), ``consumer_timeout`` (1800.0: the
    server's ``consumer_timeout``, used only to warn).

Thread-safety:
    One instance may be shared by the threads of one process. pika connections are not
    thread-safe, so each broker owns ONE connection driven by ONE I/O thread
    (:class:`AMQPLink`, pika's asynchronous ``SelectConnection``); every call from any thread
    is marshalled to it with ``add_callback_threadsafe`` and waits on a future. ``receive``
    runs in the consumer thread, ``ack``/``reject``/``extend`` in pool threads, ``publish``
    anywhere. Because the I/O thread never runs user code, AMQP heartbeats keep flowing while
    tasks run. Never share an instance across ``fork()``.

How it works (``docs/backends/amqp.md`` has the details):

* **Declarations equal Celery's defaults**: queue ``q`` is durable, non-exclusive,
  non-auto-delete, no arguments; exchange ``q`` is direct and durable; binding key ``q``.
  Messages are published to exchange ``""`` with routing key ``q``, delivery mode 2,
  ``priority`` always present, ``correlation_id``/``reply_to`` as given, headers as AMQP
  field tables. So a Celery client or worker and conveyor can share a queue without 406
  PRECONDITION_FAILED. ``max_priority``, ``queue_type="quorum"``, ``dead_letter="dlx"`` and
  ``delivery_limit`` add queue arguments: the Celery side must declare the same.
* **Publisher confirms are always on.** Every publish waits for RabbitMQ's confirm; confirms
  are asynchronous on one channel, so concurrent publishers share round trips and
  ``publish_many`` sends the whole batch before waiting once. If the connection drops before
  a confirm, the unconfirmed messages are published again after the reconnect (within
  ``operation_timeout``): never lost, possibly duplicated (at-least-once).
* **Consuming**: ``receive`` starts a ``basic.consume`` per queue with ``basic.qos``
  (per consumer, so quorum queues work) equal to the in-flight limit. Deliveries wait in a
  local buffer (ordered by priority, then arrival) until ``receive`` hands them out. A
  consumer whose unacked deliveries reach its prefetch is replaced by a new one when more is
  asked for (its held deliveries stay valid). ``size``/``purge`` count buffered deliveries
  as ready: they are, from this broker's point of view.
* **Leases**: AMQP holds a delivery until ack/reject or channel close, with no expiry. The
  lease here is client-side: a delivery not settled or extended within ``lease_seconds`` is
  given back (``basic.reject`` with requeue) by the I/O thread, and this broker's consumer on
  that queue pauses until the next ``receive``, so another consumer gets it. ``extend`` moves
  the deadline. The server still enforces ``consumer_timeout`` (30 min by default; RabbitMQ
  3.10 cannot change it per queue): a delivery held longer kills the consume channel and is
  redelivered. Raise ``consumer_timeout`` in ``rabbitmq.conf`` for longer tasks.
* **Stale receipts**: a receipt remembers the consume channel's epoch. After that channel or
  the connection closed, RabbitMQ has requeued the message; ``ack``/``reject``/``extend`` on
  the old receipt raise :class:`InvalidReceipt` and never send a stale delivery tag.
* **Delayed delivery** is held in RabbitMQ by binary decomposition (like Celery's native
  delayed delivery for quorum queues, but per target queue so that ``purge`` reaches delayed
  messages): a delay of ``n`` tenths of a second passes through the TTL queues
  ``<q>.conveyor.delay.<L>`` (``x-message-ttl`` = 100 ms x 2^L) for each bit L set in ``n``,
  routed by topic exchanges ``conveyor.delay.<L>`` on a routing key made of the 32 bits and a
  hash of the target, and lands in ``q`` through ``conveyor.delay.deliver``. Each TTL queue
  holds messages of one TTL only, so FIFO expiry is exact (no head-of-line blocking); a 1 s
  message published after a 60 s one arrives after 1 s. Delays are rounded UP to 100 ms;
  the longest is about 13.6 years (``MAX_DELAY``); a longer or infinite one raises
  ``ConfigurationError`` at publish. The ``x-death`` entries the hops add are removed on
  receipt.
* **Dead letters**: ``reject(requeue=False)`` publishes a copy to ``<q>.dead`` (with the
  reason in the header ``x-conveyor-dead-letter-reason``), waits for its confirm, then acks:
  no queue argument is needed, so the queue stays equivalent to Celery's. A copy RabbitMQ
  cannot take (headers past ``frame_max``) is replaced by one without the original headers
  (their text in ``x-conveyor-original``); only a transient failure raises. With
  ``dead_letter="dlx"`` queues are also declared with ``x-dead-letter-exchange=""`` and
  ``x-dead-letter-routing-key=<q>.dead`` (declare the same on the Celery side), so what
  RabbitMQ dead-letters itself (``delivery_limit`` on quorum queues, expired messages, a
  Celery worker's rejects) lands in ``<q>.dead`` natively, with ``x-death``. conveyor's own
  ``reject`` still publishes the copy with the reason and acks, as in the default mode:
  RabbitMQ's move cannot carry a reason (it records only ``x-death``: "rejected"), and the
  reason is what the contract promises wherever ``dead_letter`` is declared.
* **Delivery counts**: quorum queues count (``x-delivery-count``). Classic queues do not, so
  conveyor does, in the message: a delivery that RabbitMQ marks ``redelivered`` is not handed
  out; ``receive`` publishes a copy to the same queue with the header
  ``x-conveyor-deliveries`` = deliveries so far, waits for its confirm, then acks the
  original and waits until RabbitMQ has processed that ack (before the copy can be handed
  out, so a task that kills its process cannot leave both behind). The count therefore
  survives the death of any consumer (``worker_max_deliveries`` holds); a crash inside
  ``receive`` between the confirm and the ack leaves a duplicate, never a loss. The copy goes
  to the back of the queue. The first delivery of a message costs nothing (one header
  lookup, no round trip); a redelivery costs a confirmed publish and one round trip. A
  redelivery whose headers cannot take the count (``frame_max``) is dead-lettered, not
  handed out uncounted. ``Delivery.delivery_count`` is 1 on a first delivery, ``n + 1`` on a
  copy.
* **Bad input**: a message whose properties conveyor cannot use (not UTF-8 where text is
  needed, a field table pika cannot decode) is never handed out: ``receive`` dead-letters a
  stand-in (content type ``application/x-conveyor-undecodable``, the original body, the
  properties as text in ``x-conveyor-original``, the reason) and returns the rest of the
  batch. pika's table decoder is made total on import (a timestamp past the year 9999 decodes
  as its integer; a table that fails marks the message undecodable): before, one such
  message made pika drop the connection and RabbitMQ redeliver it forever. Priorities above 9
  (AMQP allows 255) are delivered as 9. Properties that exceed RabbitMQ's ``frame_max`` raise
  ``EncodeError`` at publish instead of closing the connection, and so does a body over
  ``max_message_size`` (RabbitMQ closes the connection over its own, 541 INTERNAL_ERROR:
  taken for an outage, the publish would be waited for and retried as transient). Set the
  option to the server's value when ``rabbitmq.conf`` changes it.
* **Reconnects**: when the connection drops, the I/O thread reconnects with backoff, trying
  every host; queues, exchanges and consumers are declared again on first use. Calls made
  meanwhile wait for the new connection up to ``operation_timeout`` (``receive`` up to its
  ``timeout``, then returns ``[]``; it raises once the outage is longer than
  ``operation_timeout``). A broker that never connected fails fast.
* pika exceptions are translated in one place, :func:`translate_error`. pika's field-table
  codec cannot send floats and decodes them as truncated integers (pika/pika#599): headers
  are encoded by :class:`Properties` (as py-amqp does), and importing this module installs a
  fix for pika's decoder of ``f``/``d`` values (only while pika has the bug).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import ssl
import struct
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection

from conveyor.core.base import BrokerBase, validate_queue_name
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
    QueueNotFound,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import mask_text, mask_url, parse_url, split_alternates
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    MAX_ORIGINAL_CHARS,
    ORIGINAL_HEADER,
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
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DELAY_EXCHANGE_PREFIX",
    "DELAY_LEVELS",
    "DELAY_RESOLUTION",
    "DELIVERIES_HEADER",
    "MAX_DELAY",
    "AMQPBroker",
    "AMQPBrokerOptions",
    "AMQPConnectionOptions",
    "AMQPEndpoint",
    "AMQPLink",
    "AMQPPriorityBroker",
    "Op",
    "Properties",
    "check_message_size",
    "fire",
    "parse_amqp_url",
    "redact_url",
    "rpc",
    "translate_error",
]

log = logging.getLogger("conveyor.transports.amqp")

T = TypeVar("T")

#: Classic queues: how many deliveries of the message came before this copy was published
#: (see "Delivery counts" in the module docstring). Removed from the envelope on receipt.
DELIVERIES_HEADER = "x-conveyor-deliveries"
#: Delays are counted in steps of this many seconds (rounded up).
DELAY_RESOLUTION = 0.1
#: Number of TTL levels: level L holds a message for ``DELAY_RESOLUTION * 2**L`` seconds.
DELAY_LEVELS = 32
#: The longest delay ``publish`` accepts, in seconds (about 13.6 years).
MAX_DELAY = DELAY_RESOLUTION * (2**DELAY_LEVELS - 1)
#: Topic exchanges ``conveyor.delay.<L>`` and ``conveyor.delay.deliver``.
DELAY_EXCHANGE_PREFIX = "conveyor.delay."
#: The ``max_message_size`` option's default: RabbitMQ's own default (128 MiB), in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 128 << 20

_SCHEMES = ("amqp", "amqps", "pyamqp")
_MAX_COUNT = 2**31 - 2  # x-conveyor-deliveries stays a 32-bit AMQP integer
_DELAY_WHY = "a delay passes through 32 TTL queues of 0.1 s x 2**level"
# Properties a re-published copy keeps (user_id is dropped: RabbitMQ checks it against the
# publishing connection's user; headers are given separately).
_COPIED_PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "app_id", "cluster_id",
)  # fmt: skip
_DELIVER_EXCHANGE = DELAY_EXCHANGE_PREFIX + "deliver"
_DELAY_QUEUE_INFIX = ".conveyor.delay."
_MAX_NAME_BYTES = 255
_MAX_PREFETCH = 65535
_CHANNELS = ("pub", "adm", "con")
# A content header frame: 7 bytes of frame header, class id, weight, body size, frame end.
_HEADER_OVERHEAD = 7 + 2 + 2 + 8 + 1
_RETRY_LOG_INTERVAL = 30.0  # seconds between warnings while reconnect attempts keep failing
# Headers RabbitMQ adds that are not part of the envelope.
_DEATH_SUMMARY_KEYS = (
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}


# ============================================================================== options


@dataclass(frozen=True)
class AMQPConnectionOptions:
    """Connection options shared by :class:`AMQPBroker` and the ``rpc://`` backend.

    Attributes:
        heartbeat: AMQP heartbeat timeout in seconds (rounded to whole seconds; 0 disables).
        connect_timeout: seconds for one TCP + TLS + AMQP handshake to one host.
        operation_timeout: the longest any call waits for RabbitMQ, including waiting for a
            dropped connection to come back.
        retry_interval: first pause between reconnect attempts; doubles each failure.
        max_retry_interval: cap of that pause.
        ssl_ca_certs: CA bundle for ``amqps://`` (None: the system's).
        ssl_certfile: client certificate (PEM) for mutual TLS.
        ssl_keyfile: its private key (PEM).
        ssl_cert_reqs: ``required`` (default), ``optional`` or ``none``.
        ssl_check_hostname: check the server certificate's host name.
        ssl_context: a ready :class:`ssl.SSLContext`; overrides the ``ssl_*`` fields.
        connection_name: shown in RabbitMQ's management UI and ``rabbitmqctl``.
        max_message_size: the largest body, in bytes, a publish (or an ``rpc://`` result)
            may carry; a bigger one raises ``EncodeError`` before anything is sent. Default
            128 MiB, RabbitMQ's default ``max_message_size``: set the server's value.
    """

    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    operation_timeout: float = 10.0
    retry_interval: float = 0.2
    max_retry_interval: float = 2.0
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    ssl_context: Any = None
    connection_name: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "operation_timeout", "retry_interval"):
            _positive(name, getattr(self, name))
        size = self.max_message_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"max_message_size must be a number of bytes >= 1: {size!r}")
        if not (math.isfinite(self.heartbeat) and self.heartbeat >= 0):
            raise ConfigurationError(f"heartbeat must be >= 0 seconds: {self.heartbeat!r}")
        if self.max_retry_interval < self.retry_interval:
            raise ConfigurationError("max_retry_interval must be >= retry_interval")
        if _cert_reqs(self.ssl_cert_reqs) is None:
            raise ConfigurationError(
                f"ssl_cert_reqs must be required, optional or none, not {self.ssl_cert_reqs!r}"
            )
        if self.ssl_context is not None and not isinstance(self.ssl_context, ssl.SSLContext):
            raise ConfigurationError("ssl_context must be an ssl.SSLContext")


@dataclass(frozen=True)
class AMQPBrokerOptions(AMQPConnectionOptions):
    """Options of :class:`AMQPBroker` (seconds as float). Connection fields: see the base.

    Attributes:
        lease_seconds: a delivery not acked, rejected or extended within this many seconds is
            given back to RabbitMQ (requeued, ``redelivered``).
        prefetch_count: ``basic.qos`` of each consumer; None: the ``max_messages`` of the
            ``receive`` call that starts the consumer (the worker's first call asks for its
            whole in-flight limit).
        max_priority: declare queues with ``x-max-priority`` (1-255) and accept priorities;
            :meth:`AMQPBroker.from_url` then returns an :class:`AMQPPriorityBroker`.
        queue_type: ``classic`` (Celery's default) or ``quorum`` (``x-queue-type``).
        dead_letter: ``publish`` (copy to ``<q>.dead`` then ack; no queue argument) or
            ``dlx`` (also the queue arguments ``x-dead-letter-exchange``/``-routing-key``,
            for what RabbitMQ dead-letters itself; ``reject`` still publishes the copy).
        delivery_limit: quorum queues only: ``x-delivery-limit`` (RabbitMQ drops, or with
            ``dlx`` dead-letters, a message returned more often).
        consumer_timeout: the server's ``consumer_timeout`` in seconds, only used to warn
            when a delivery is held close to it (None: never warn).
    """

    lease_seconds: float = 60.0
    prefetch_count: int | None = None
    max_priority: int | None = None
    queue_type: str = "classic"
    dead_letter: str = "publish"
    delivery_limit: int | None = None
    consumer_timeout: float | None = 1800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("lease_seconds", self.lease_seconds)
        if self.prefetch_count is not None and not 1 <= self.prefetch_count <= _MAX_PREFETCH:
            raise ConfigurationError(f"prefetch_count must be 1-{_MAX_PREFETCH}")
        if self.max_priority is not None and not 1 <= self.max_priority <= 255:
            raise ConfigurationError(f"max_priority must be 1-255, got {self.max_priority}")
        if self.queue_type not in ("classic", "quorum"):
            raise ConfigurationError(f"queue_type must be classic or quorum: {self.queue_type!r}")
        if self.queue_type == "quorum" and self.max_priority is not None:
            raise ConfigurationError("RabbitMQ quorum queues do not support x-max-priority")
        if self.dead_letter not in ("publish", "dlx"):
            raise ConfigurationError(f"dead_letter must be publish or dlx: {self.dead_letter!r}")
        if self.delivery_limit is not None:
            if self.queue_type != "quorum":
                raise ConfigurationError("delivery_limit needs queue_type='quorum'")
            if self.delivery_limit < 1:
                raise ConfigurationError("delivery_limit must be >= 1")
        if self.consumer_timeout is not None:
            _positive("consumer_timeout", self.consumer_timeout)


def check_message_size(body: bytes, limit: int, what: str = "message") -> None:
    """Refuse a body RabbitMQ would take for a reason to close the connection.

    Raises:
        EncodeError: ``body`` is longer than ``limit`` bytes (the ``max_message_size``
            option): not transient, sending it again cannot succeed.
    """
    if len(body) > limit:
        raise EncodeError(
            f"{what} cannot be sent over AMQP: its body takes {len(body)} bytes, more than "
            f"max_message_size ({limit} bytes; RabbitMQ closes the connection over its own "
            "max_message_size, 128 MiB by default)"
        )


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")


def _cert_reqs(text: str) -> ssl.VerifyMode | None:
    return _CERT_REQS.get(str(text).strip().lower())


# ============================================================================== URLs


@dataclass(frozen=True)
class AMQPEndpoint:
    """One host to connect to. ``password`` never appears in ``repr``."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: bool = False

    def __str__(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{self.vhost}"


def parse_amqp_url(url: str) -> tuple[list[AMQPEndpoint], dict[str, str]]:
    """Parse ``amqp://``/``amqps://``/``pyamqp://`` URLs (``;`` alternates) as kombu does.

    Returns:
        The endpoints in failover order and the merged query parameters (a later
        alternate's key overrides an earlier one's).

    Raises:
        InvalidURL: a scheme that is not AMQP, a bad host or port.
    """
    endpoints: list[AMQPEndpoint] = []
    query: dict[str, str] = {}
    for alternate in split_alternates(url):
        parsed = parse_url(alternate, default_host="localhost")
        if parsed.scheme not in _SCHEMES:
            raise InvalidURL(
                f"{mask_url(alternate)!r} is not an AMQP URL (amqp://, amqps://, pyamqp://)"
            )
        tls = parsed.scheme == "amqps"
        vhost = parsed.path or "/"
        for host, port in parsed.hosts:
            endpoints.append(
                AMQPEndpoint(
                    host=host,
                    port=port if port is not None else (5671 if tls else 5672),
                    vhost=vhost,
                    username=parsed.username if parsed.username is not None else "guest",
                    password=parsed.password if parsed.password is not None else "guest",
                    tls=tls,
                )
            )
        query.update(parsed.query)
    return endpoints, query


def redact_url(url: str) -> str:
    """:func:`~conveyor.core.urls.mask_url`, and the user name masked too where it equals the
    password of any of the URL's endpoints (``guest:guest``): printing it would print the
    password. (mask_url alone reads ``;``-joined alternates with a raw ``;`` in a password
    as one URL, and would show the user name of the first one.)"""
    masked = mask_url(url)
    try:
        endpoints = parse_amqp_url(url)[0] if url else []
    except ConveyorError:
        return masked
    for endpoint in endpoints:
        if endpoint.username and endpoint.username == endpoint.password:
            user = quote(endpoint.username, safe="")
            masked = masked.replace(f"//{user}:***@", "//***:***@")
            masked = masked.replace(f"//{endpoint.username}:***@", "//***:***@")
    return masked


def _ssl_context(options: AMQPConnectionOptions) -> ssl.SSLContext:
    if options.ssl_context is not None:
        context: ssl.SSLContext = options.ssl_context
        return context
    reqs = _cert_reqs(options.ssl_cert_reqs)
    context = ssl.create_default_context(cafile=options.ssl_ca_certs)
    context.check_hostname = bool(options.ssl_check_hostname) and reqs == ssl.CERT_REQUIRED
    context.verify_mode = reqs if reqs is not None else ssl.CERT_REQUIRED
    if options.ssl_certfile:
        context.load_cert_chain(options.ssl_certfile, options.ssl_keyfile)
    return context


def connection_parameters(
    endpoint: AMQPEndpoint, options: AMQPConnectionOptions, *, name: str
) -> pika.ConnectionParameters:
    """pika parameters for one endpoint (one attempt each: the link does the retrying)."""
    ssl_options = None
    if endpoint.tls:
        ssl_options = pika.SSLOptions(_ssl_context(options), server_hostname=endpoint.host)
    return pika.ConnectionParameters(
        host=endpoint.host,
        port=endpoint.port,
        virtual_host=endpoint.vhost,
        credentials=pika.PlainCredentials(
            endpoint.username, endpoint.password, erase_on_connect=False
        ),
        heartbeat=round(options.heartbeat),
        connection_attempts=1,
        retry_delay=0,
        socket_timeout=options.connect_timeout,
        stack_timeout=options.connect_timeout,
        blocked_connection_timeout=None,
        ssl_options=ssl_options,
        client_properties={"connection_name": options.connection_name or name},
    )


# ============================================================================== properties


def _encode_value(pieces: list[bytes], value: Any) -> None:
    """One AMQP field-table value, typed as py-amqp (Celery's client) types it.

    pika's own encoder has no ``float`` (py-amqp sends ``d``, a double) and no ``tuple``.
    """
    if isinstance(value, str):
        raw = value.encode("utf-8")
        pieces += [struct.pack(">cI", b"S", len(raw)), raw]
    elif isinstance(value, (bytes, bytearray)):
        pieces += [struct.pack(">cI", b"x", len(value)), bytes(value)]
    elif isinstance(value, bool):
        pieces.append(struct.pack(">cB", b"t", int(value)))
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            pieces.append(struct.pack(">ci", b"I", value))
        else:
            pieces.append(struct.pack(">cq", b"l", value))  # struct.error beyond 64 bits
    elif isinstance(value, float):
        pieces.append(struct.pack(">cd", b"d", value))
    elif value is None:
        pieces.append(b"V")
    elif isinstance(value, Mapping):
        pieces.append(b"F")
        _encode_table(pieces, value)
    elif isinstance(value, (list, tuple)):
        items: list[bytes] = []
        for item in value:
            _encode_value(items, item)
        payload = b"".join(items)
        pieces += [struct.pack(">cI", b"A", len(payload)), payload]
    else:  # Decimal, datetime: pika knows them; anything else raises there
        pika.data.encode_value(pieces, value)


def _encode_table(pieces: list[bytes], table: Mapping[str, Any]) -> None:
    items: list[bytes] = []
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"header keys must be strings, got {key!r}")
        pika.data.encode_short_string(items, key)
        _encode_value(items, value)
    payload = b"".join(items)
    pieces += [struct.pack(">I", len(payload)), payload]


_SHORT_STRING_PROPERTIES = (
    ("content_type", "FLAG_CONTENT_TYPE"),
    ("content_encoding", "FLAG_CONTENT_ENCODING"),
)
_LATER_SHORT_STRINGS = (
    ("correlation_id", "FLAG_CORRELATION_ID"),
    ("reply_to", "FLAG_REPLY_TO"),
    ("expiration", "FLAG_EXPIRATION"),
    ("message_id", "FLAG_MESSAGE_ID"),
)
_LAST_SHORT_STRINGS = (
    ("type", "FLAG_TYPE"),
    ("app_id", "FLAG_APP_ID"),
    ("cluster_id", "FLAG_CLUSTER_ID"),
)


class Properties(pika.BasicProperties):  # type: ignore[misc]
    """``pika.BasicProperties`` whose headers are encoded like py-amqp's (floats as ``d``).

    Supports every property but ``user_id`` (RabbitMQ refuses one that is not the publishing
    connection's user, so a copy conveyor makes of someone else's message drops it). The
    encoding is made once and kept: the publisher measures it against ``frame_max`` before
    pika sends it (a header frame RabbitMQ cannot take closes the whole connection).
    """

    __slots__ = ("_conveyor_encoded",)  # a slot: not in __dict__, so not in repr or ==
    _conveyor_encoded: list[bytes]

    def encode(self) -> list[bytes]:
        try:
            cached: list[bytes] = self._conveyor_encoded
        except AttributeError:
            cached = self._conveyor_encoded = self._encode()
        return cached

    def _encode(self) -> list[bytes]:
        cls = pika.BasicProperties
        pieces: list[bytes] = []
        flags = 0
        for attr, flag in _SHORT_STRING_PROPERTIES:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        if self.headers is not None:
            flags |= cls.FLAG_HEADERS
            _encode_table(pieces, self.headers)
        if self.delivery_mode is not None:
            flags |= cls.FLAG_DELIVERY_MODE
            pieces.append(struct.pack("B", self.delivery_mode))
        if self.priority is not None:
            flags |= cls.FLAG_PRIORITY
            pieces.append(struct.pack("B", self.priority))
        for attr, flag in _LATER_SHORT_STRINGS:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        if self.timestamp is not None:
            flags |= cls.FLAG_TIMESTAMP
            pieces.append(struct.pack(">Q", self.timestamp))
        if self.user_id is not None:
            raise ValueError("conveyor does not send user_id")
        for attr, flag in _LAST_SHORT_STRINGS:
            value = getattr(self, attr)
            if value is not None:
                flags |= getattr(cls, flag)
                pika.data.encode_short_string(pieces, value)
        return [struct.pack(">H", flags), *pieces]


#: Header that stands for a field table pika could not decode (see _fix_pika_decoding).
_UNDECODABLE_TABLE = "x-conveyor-undecodable-table"


def _fix_pika_decoding() -> bool:
    """Make pika's field-table decoder total, on import, process-wide.

    * ``f``/``d`` values decode as floats (pika/pika#599 truncates them to integers, so
      Celery's ``timelimit`` ``[0.5, None]`` would arrive as ``[0, None]``); only while
      pika has the bug.
    * A ``T`` (timestamp) value that Python's datetime cannot hold (RabbitMQ passes any 64
      bits on) decodes as its integer seconds instead of raising ``OverflowError``.
    * A table that still fails to decode becomes ``{_UNDECODABLE_TABLE: "<why>"}`` (its length
      prefix says where it ends), and the broker dead-letters that message.

    Without the last two, one such message raised inside pika's frame parser: the
    connection dropped, RabbitMQ redelivered the message, and the consumer looped on it
    forever without delivering anything else. Every other value goes to pika's decoder.
    Returns whether anything was installed.
    """
    data = pika.data
    original_value, original_table = data.decode_value, data.decode_table
    if getattr(original_table, "__conveyor_fix__", False):
        return False
    float_bug = original_value(struct.pack(">cd", b"d", 0.5), 0)[0] != 0.5

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset : offset + 1]
        if kind == b"T":
            stamp = struct.unpack_from(">Q", encoded, offset + 1)[0]
            try:
                return datetime.fromtimestamp(stamp, timezone.utc), offset + 9
            except (OverflowError, ValueError, OSError):
                return stamp, offset + 9
        if float_bug and kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if float_bug and kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        result: tuple[Any, int] = original_value(encoded, offset)
        return result

    def decode_table(encoded: bytes, offset: int) -> tuple[dict[Any, Any], int]:
        try:
            result: tuple[dict[Any, Any], int] = original_table(encoded, offset)
            return result
        except Exception as exc:  # RecursionError, struct.error, an unknown field type...
            end = offset + 4 + struct.unpack_from(">I", encoded, offset)[0]
            return {_UNDECODABLE_TABLE: f"{type(exc).__name__}: {_said(exc)}"[:200]}, end

    decode_value.__conveyor_fix__ = True  # type: ignore[attr-defined]
    decode_table.__conveyor_fix__ = True  # type: ignore[attr-defined]
    data.decode_value = decode_value
    data.decode_table = decode_table
    return True


_fix_pika_decoding()


# ============================================================================== errors


class _Nacked(OperationalError):
    """RabbitMQ answered a publish with basic.nack (a full queue with ``reject-publish``, an
    internal error): the message was not accepted. Transient for callers."""


class _LinkDown(Exception):
    """Internal: the connection (or the publish channel) went away mid-operation.

    The caller may retry once the link is open again; ``error`` says what happened.
    """

    def __init__(self, error: ConveyorError) -> None:
        super().__init__(str(error))
        self.error = error


def _unwrap(exc: BaseException) -> BaseException:
    """The innermost meaningful error of pika's connection-workflow wrappers."""
    from pika.adapters.utils import connection_workflow as workflow

    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(exc, workflow.AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(exc, workflow.AMQPConnectorPhaseErrorBase):
            exc = exc.exception
        else:
            break
    return exc


def translate_error(exc: BaseException, where: str = "RabbitMQ") -> ConveyorError:
    """Map a pika (or socket) exception to conveyor's tree. The ONE place that does so.

    * channel closed by the broker: 404 NOT_FOUND -> :class:`QueueNotFound`; 403
      ACCESS_REFUSED and 406 PRECONDITION_FAILED (inequivalent declaration, unknown delivery
      tag) -> :class:`ConfigurationError`; other codes -> :class:`OperationalError`;
    * authentication or vhost access refused -> :class:`ConfigurationError`;
    * anything about the connection (refused, reset, heartbeat missed, forced close,
      wrong state) -> :class:`ConnectionLost`; a timed-out handshake ->
      :class:`OperationTimeout`;
    * any other pika error -> :class:`OperationalError`.

    Messages name the operation and RabbitMQ's reply text, never a password.
    """
    from pika.adapters.utils import connection_workflow as workflow

    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, _LinkDown):
        return exc.error
    inner = _unwrap(exc)
    errors = pika.exceptions
    if isinstance(inner, errors.ChannelClosedByBroker):
        said = mask_text(str(inner.reply_text))
        text = f"{where}: RabbitMQ closed the channel: {inner.reply_code} {said}"
        if inner.reply_code == 404:
            return QueueNotFound(text)
        if inner.reply_code in (403, 406):
            return ConfigurationError(text)
        return OperationalError(text)
    if isinstance(
        inner,
        (
            errors.ProbableAuthenticationError,
            errors.ProbableAccessDeniedError,
            errors.AuthenticationError,
        ),
    ):
        return ConfigurationError(
            f"{where}: RabbitMQ refused the login or the vhost ({type(inner).__name__}): "
            f"{_said(inner)}"
        )
    if isinstance(inner, errors.ConnectionClosedByBroker) and inner.reply_code in (403, 530):
        return ConfigurationError(
            f"{where}: RabbitMQ refused access: {mask_text(str(inner.reply_text))}"
        )
    if isinstance(inner, workflow.AMQPConnectorStackTimeout):
        return OperationTimeout(f"{where}: connecting timed out")
    if isinstance(
        inner,
        (
            errors.AMQPConnectionError,
            errors.ChannelWrongStateError,
            errors.ChannelClosed,
            workflow.AMQPConnectorException,
            OSError,
        ),
    ):
        detail = f"{type(inner).__name__}: {_said(inner)}" if str(inner) else type(inner).__name__
        return ConnectionLost(f"{where}: {detail}")
    if isinstance(inner, errors.AMQPError):
        return OperationalError(f"{where}: {type(inner).__name__}: {_said(inner)}")
    return OperationalError(f"{where}: {type(exc).__name__}: {_said(exc)}")


def _said(exc: BaseException) -> str:
    """A driver's or socket's error text, masked (it may quote connection parameters)."""
    return mask_text(str(exc))


class _QuietProbes(logging.Filter):
    """Drop pika's warning for a 404 on an admin channel of ours.

    Passive declares that find nothing (does this delay level exist? how big is a queue that
    was never declared?) close the channel with 404 by design; the link handles that and
    reopens the channel. Every other pika message passes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3 and args[0] == 404:
            try:
                return args[2] not in self.channels
            except TypeError:  # pragma: no cover - an unhashable argument
                return True
        return True


_quiet_probes = _QuietProbes()
logging.getLogger("pika.channel").addFilter(_quiet_probes)


# ============================================================================== the link


@dataclass(frozen=True, slots=True)
class _Rpc:
    """One step of an admin operation: call ``start(channel, callback)`` on channel
    ``channel``; the operation resumes with the reply frame."""

    channel: str
    start: Callable[[Any, Callable[[Any], None]], None]


def rpc(channel: str, method: str, *args: Any, **kwargs: Any) -> _Rpc:
    """The step "call ``method(*args, **kwargs, callback=...)`` on channel ``channel``"."""

    def start(ch: Any, callback: Callable[[Any], None]) -> None:
        getattr(ch, method)(*args, callback=callback, **kwargs)

    return _Rpc(channel, start)


def fire(channel: str, method: str, *args: Any, **kwargs: Any) -> _Rpc:
    """Like :func:`rpc` but with ``nowait`` (no reply is awaited; a failure closes the
    channel, which the next :func:`rpc` step on it reports). Pipelines idempotent steps."""

    def start(ch: Any, callback: Callable[[Any], None]) -> None:
        getattr(ch, method)(*args, **kwargs)
        callback(None)

    return _Rpc(channel, start)


Op = Generator[_Rpc, Any, T]
"""An admin operation: a generator that yields :class:`_Rpc` steps and returns a value.

A channel error during a step is thrown into the generator (translated), so an operation may
catch it (a passive declare that finds nothing) and go on; the channel is reopened first."""

PubEntry = tuple[str, str, bytes, Any]
"""(exchange, routing key, body, ``pika.BasicProperties``)."""


class _Chan:
    __slots__ = ("channel", "epoch", "open")

    def __init__(self) -> None:
        self.channel: Any = None
        self.open = False
        self.epoch = 0


class _OpState:
    __slots__ = ("abandoned", "future", "gen", "pending", "token", "waiting")

    def __init__(self, gen: Op[Any]) -> None:
        self.gen = gen
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.pending: _Rpc | None = None
        self.waiting: str | None = None
        self.token = 0
        self.abandoned = False


class _PubBatch:
    """Messages published together; done when every one is confirmed or one failed."""

    __slots__ = ("abandoned", "confirmed", "done", "entries", "error", "left")

    def __init__(self, entries: list[PubEntry]) -> None:
        self.entries = entries
        self.confirmed = [False] * len(entries)
        self.left = len(entries)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.abandoned = False

    def ack(self, index: int) -> None:
        if not self.confirmed[index]:
            self.confirmed[index] = True
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None and self.left:
            self.error = error
            self.done.set()


_IDLE, _CONNECTING, _OPEN, _DOWN, _CLOSED = "idle", "connecting", "open", "down", "closed"


class AMQPLink:
    """One AMQP connection, its three channels and the I/O thread that owns them.

    Channels: ``pub`` (publisher confirms), ``adm`` (declarations, purges, passive declares;
    reopened after a channel error) and ``con`` (``basic.qos``/``basic.consume``, acks).
    Every pika object is touched only by the I/O thread; other threads use
    :meth:`call_soon`, :meth:`run`, :meth:`run_op` and :meth:`publish`.

    The owner may set these hooks, all called on the I/O thread:

    * ``on_ready(generation)``: a new connection is open with all channels;
    * ``on_lost()``: the connection is gone (everything tied to it is invalid);
    * ``on_channel_reset(name, old_epoch)``: one channel closed while the connection lives;
    * ``on_consumer_cancelled(tag)``: RabbitMQ cancelled a consumer (queue deleted);
    * ``on_tick()``: every ``tick_interval`` seconds while open.

    Args:
        endpoints: hosts in failover order.
        options: connection options.
        name: used in logs, errors and as the default connection name.
        url: the URL, for messages (masked before use).
    """

    def __init__(
        self,
        endpoints: Sequence[AMQPEndpoint],
        options: AMQPConnectionOptions,
        *,
        name: str,
        url: str = "",
        tick_interval: float | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("an AMQP link needs at least one host")
        self.endpoints = list(endpoints)
        self.options = options
        self.name = name
        self.where = redact_url(url) or ", ".join(str(e) for e in self.endpoints)
        self.tick_interval = tick_interval
        self.on_ready: Callable[[int], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_channel_reset: Callable[[str, int], None] | None = None
        self.on_consumer_cancelled: Callable[[str], None] | None = None
        self.on_tick: Callable[[], None] | None = None
        # Shared state, guarded by _cond.
        self._cond = threading.Condition(threading.Lock())
        self._state = _IDLE
        self._generation = 0
        self._ever_connected = False
        self._round_failed = False
        self._last_error: ConveyorError | None = None
        self._down_since: float | None = None
        self._blocked = False
        self._thread: threading.Thread | None = None
        self._ioloop = IOLoop()
        # I/O-thread state.
        self._conn: Any = None
        self._chans = {name: _Chan() for name in _CHANNELS}
        self._ops: deque[_OpState] = deque()
        self._op: _OpState | None = None
        self._tokens = itertools.count(1)
        self._pub_seq = 0
        self._unconfirmed: OrderedDict[int, tuple[_PubBatch, int]] = OrderedDict()
        self._pub_parked: list[_PubBatch] = []
        self._pub_lock = threading.Lock()
        self._pub_queue: deque[_PubBatch] = deque()
        self._pub_wake = False
        self._backoff = options.retry_interval
        self._last_retry_log = -math.inf
        self._retry_handle: Any = None
        self._tick_handle: Any = None
        self._workflow: Any = None
        self._attempt: object = None
        self._closing = False

    # ------------------------------------------------------------------ caller side
    @property
    def generation(self) -> int:
        """Number of the current connection (1 for the first); changes on reconnect."""
        return self._generation

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def ever_connected(self) -> bool:
        return self._ever_connected

    def down_for(self) -> float:
        """Seconds since the connection was lost (0.0 while open)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def start(self) -> None:
        """Start the I/O thread and the first connection attempt. Idempotent."""
        with self._cond:
            if self._thread is not None or self._state == _CLOSED:
                return
            self._state = _CONNECTING
            thread = threading.Thread(target=self._main, name=f"{self.name}-io", daemon=True)
            self._thread = thread
        thread.start()
        self.call_soon(self._connect)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread soon (thread-safe)."""
        self._ioloop.add_callback_threadsafe(fn)

    def await_open(self, deadline: float, *, fail_fast: bool = True) -> int:
        """Block until the connection is open; return its generation.

        Raises:
            ConnectionLost: closed, or not open by ``deadline``; at once (``fail_fast``) when
                no connection was ever made and the last attempt failed.
            ConfigurationError: that attempt was refused for credentials or vhost.
        """
        self.start()
        with self._cond:
            while True:
                state = self._state
                if state == _CLOSED:
                    raise ConnectionLost(f"{self.name} is closed")
                if state == _OPEN:
                    return self._generation
                if fail_fast and not self._ever_connected and self._round_failed:
                    raise self._failure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(waited=True)
                self._cond.wait(remaining)

    def _failure(self, *, waited: bool = False) -> ConveyorError:
        last = self._last_error
        if isinstance(last, ConfigurationError):
            return last
        if waited and self._ever_connected:
            detail = f" (connection lost {self.down_for():.1f}s ago, reconnecting)"
        elif waited:
            detail = " (still connecting)"
        else:
            detail = ""
        reason = f": {last}" if last is not None else ""
        return ConnectionLost(f"cannot reach RabbitMQ at {self.where}{detail}{reason}")

    def run(self, fn: Callable[[], T], deadline: float) -> T:
        """Run ``fn`` on the I/O thread and return its result (or raise its error)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        if self._state == _CLOSED:
            raise ConnectionLost(f"{self.name} is closed")
        self.call_soon(call)
        return self._wait(future, deadline)

    def run_op(self, op: Op[T], deadline: float) -> T:
        """Run an admin operation (see :data:`Op`) once the connection is open.

        Raises:
            _LinkDown: the connection dropped while it ran (the caller may retry).
            OperationTimeout: not done by ``deadline`` (it may still complete).
        """
        state = _OpState(op)

        def enqueue() -> None:
            if self._state != _OPEN:
                state.future.set_exception(_LinkDown(self._down_error()))
                return
            self._ops.append(state)
            self._kick_ops()

        self.call_soon(enqueue)
        try:
            result: T = self._wait(state.future, deadline)
        except OperationTimeout:
            state.abandoned = True
            raise
        return result

    def run_op_retrying(self, make_op: Callable[[], Op[T]], deadline: float) -> T:
        """:meth:`run_op` for idempotent operations: after a reconnect, run it again."""
        while True:
            self.await_open(deadline)
            try:
                return self.run_op(make_op(), deadline)
            except _LinkDown:
                if time.monotonic() >= deadline:
                    raise self._failure(waited=True) from None

    def publish(self, entries: Sequence[PubEntry], deadline: float) -> None:
        """Publish ``entries`` and return once RabbitMQ confirmed every one.

        If the connection drops first, the unconfirmed ones are published again on the next
        connection (so a message may arrive twice, never zero times) until ``deadline``.

        Raises:
            ConnectionLost: not reconnected by ``deadline`` (or never connected).
            OperationTimeout: confirms did not arrive by ``deadline``.
            OperationalError: RabbitMQ nacked a message.
            EncodeError: a header value AMQP cannot carry (nothing after it was sent).
        """
        todo = list(entries)
        total = len(todo)
        while todo:
            self.await_open(deadline)
            batch = _PubBatch(todo)
            self._submit(batch)
            remaining = deadline - time.monotonic()
            if not batch.done.wait(max(0.0, remaining)):
                batch.abandoned = True
                blocked = " (RabbitMQ is blocking publishers: resource alarm)"
                raise OperationTimeout(
                    f"publishing to {self.where}: {total - batch.left} of {total} messages "
                    f"confirmed within {self.options.operation_timeout:g}s"
                    f"{blocked if self._blocked else ''}; the others may or may not have "
                    "been accepted"
                )
            error = batch.error
            if error is None:
                return
            if isinstance(error, _LinkDown):
                todo = [e for e, ok in zip(batch.entries, batch.confirmed, strict=True) if not ok]
                if time.monotonic() >= deadline:
                    raise error.error
                continue
            raise error

    def _submit(self, batch: _PubBatch) -> None:
        # Concurrent publishers queue their batches and wake the I/O thread once per burst
        # (one pipe write), not once per message.
        with self._pub_lock:
            self._pub_queue.append(batch)
            if self._pub_wake:
                return
            self._pub_wake = True
        self.call_soon(self._drain_batches)

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop the I/O thread. Idempotent."""
        with self._cond:
            if self._state == _CLOSED:
                return
            self._state = _CLOSED
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._ioloop.close()
            return
        self.call_soon(self._io_close)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _wait(self, future: concurrent.futures.Future[T], deadline: float) -> T:
        remaining = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, remaining))
        except concurrent.futures.TimeoutError:
            future.cancel()
            if self._state == _CLOSED:
                raise ConnectionLost(f"{self.name} is closed") from None
            raise OperationTimeout(
                f"RabbitMQ at {self.where} did not answer within "
                f"{self.options.operation_timeout:g}s"
            ) from None

    # ------------------------------------------------------------------ I/O thread: lifecycle
    def _main(self) -> None:
        try:
            while True:
                try:
                    self._ioloop.start()
                    break  # stopped on purpose (_io_close)
                except Exception:
                    if self._closing:
                        raise
                    # pika raises out of its own callbacks now and then, e.g. ValueError
                    # "Expected connected socket, but getpeername() failed" when a peer
                    # accepts the TCP connection and drops it at once (a proxy refusing,
                    # a server going down). Letting that end this thread closed the broker
                    # for good and left a worker running with nothing to consume: treat it
                    # as a failed connection instead and go on reconnecting.
                    log.exception("%s: error inside the I/O loop; reconnecting", self.name)
                    self._recover()
        except Exception:  # pragma: no cover - a failure while closing; keep it visible
            log.exception("%s: I/O loop crashed", self.name)
        finally:
            with self._cond:
                self._state = _CLOSED
                self._cond.notify_all()
            self._fail_everything(ConnectionLost(f"{self.name} is closed"))
            self._ioloop.close()

    def _recover(self) -> None:
        """I/O thread, loop stopped by an exception: drop what was in flight and schedule a
        reconnect (with the usual backoff) unless one is scheduled already."""
        workflow, self._workflow = self._workflow, None
        self._attempt = None  # whatever that attempt still reports is ignored
        if workflow is not None:
            with contextlib.suppress(Exception):  # already finished: nothing to abort
                workflow.abort()
        conn = self._conn
        if conn is not None and not conn.is_closed:

            def close() -> None:
                # Closing reports through _on_connection_closed, which reconnects.
                if conn.is_closed or conn.is_closing:
                    return
                try:
                    conn.close()
                except Exception as exc:  # broken beyond closing: report it closed ourselves
                    self._on_connection_closed(conn, exc)

            self._ioloop.add_callback_threadsafe(close)
            return
        if self._retry_handle is None and self._workflow is None:
            self._on_connect_done(ConnectionLost(f"connecting to {self.where} failed"))

    def _set_state(self, state: str) -> None:
        with self._cond:
            if self._state != _CLOSED:
                self._state = state
            self._cond.notify_all()

    def _down_error(self) -> ConveyorError:
        if self._state == _CLOSED:
            return ConnectionLost(f"{self.name} is closed")
        return self._last_error or ConnectionLost(f"not connected to RabbitMQ at {self.where}")

    def _connect(self) -> None:
        self._retry_handle = None
        if self._closing or self._state == _CLOSED:
            return
        if self._workflow is not None:
            return  # an attempt is under way already
        with self._cond:
            self._state = _CONNECTING
            self._round_failed = False
            self._cond.notify_all()
        try:
            params = [
                connection_parameters(e, self.options, name=self.name) for e in self.endpoints
            ]
            token = object()  # which attempt a report belongs to (see _recover)
            self._attempt = token
            self._workflow = SelectConnection.create_connection(
                params,
                lambda result: self._on_connect_done(result, attempt=token),
                custom_ioloop=self._ioloop,
            )
        except (OSError, ValueError, ssl.SSLError) as exc:  # bad TLS files and the like
            self._on_connect_done(exc)

    def _on_connect_done(self, result: Any, *, attempt: object = None) -> None:
        if attempt is not None and attempt is not self._attempt:
            # The report of an attempt _recover abandoned: never a second connection.
            if not isinstance(result, BaseException):
                with contextlib.suppress(Exception):
                    result.close()
            return
        self._workflow = None
        if isinstance(result, BaseException):
            error = translate_error(result, f"connecting to {self.where}")
            with self._cond:
                self._last_error = error
                self._round_failed = True
                if self._state != _CLOSED:
                    self._state = _DOWN
                    if self._down_since is None and self._ever_connected:
                        self._down_since = time.monotonic()
                self._cond.notify_all()
            if self._closing:
                return
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self.options.max_retry_interval)
            now = time.monotonic()
            if now - self._last_retry_log >= _RETRY_LOG_INTERVAL:
                self._last_retry_log = now
                log.warning("%s: %s; retrying in %.1fs", self.name, error, delay)
            else:
                log.debug("%s: %s; retrying in %.1fs", self.name, error, delay)
            self._retry_handle = self._ioloop.call_later(delay, self._connect)
            return
        conn = result
        if self._closing:
            conn.close()
            return
        self._conn = conn
        conn.add_on_close_callback(self._on_connection_closed)
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        for name in _CHANNELS:
            self._open_channel(name)

    def _open_channel(self, name: str) -> None:
        conn = self._conn
        if conn is None or not conn.is_open or self._closing:
            return
        try:
            conn.channel(on_open_callback=lambda ch: self._on_channel_open(name, ch))
        except pika.exceptions.AMQPError as exc:  # connection closing: the close callback follows
            log.debug("%s: cannot open channel %s: %s", self.name, name, _said(exc))

    def _on_channel_open(self, name: str, channel: Any) -> None:
        if self._conn is None or self._closing:
            return
        chan = self._chans[name]
        chan.channel = channel
        channel.add_on_close_callback(lambda ch, reason: self._on_channel_closed(name, ch, reason))
        if name == "con":
            channel.add_on_cancel_callback(self._on_cancel)
        if name == "adm":
            _quiet_probes.channels.add(channel)
        if name == "pub":
            self._pub_seq = 0
            channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._ready(name))
        else:
            self._ready(name)

    def _ready(self, name: str) -> None:
        chan = self._chans[name]
        if chan.channel is None:
            return
        chan.open = True
        chan.epoch += 1
        if self._state == _CONNECTING:
            if all(c.open for c in self._chans.values()):
                with self._cond:
                    self._generation += 1
                    self._ever_connected = True
                    self._last_error = None
                    self._down_since = None
                    if self._state != _CLOSED:
                        self._state = _OPEN
                    self._cond.notify_all()
                self._backoff = self.options.retry_interval
                self._last_retry_log = -math.inf
                log.info("%s: connected to %s", self.name, self._conn_desc())
                self._schedule_tick()
                if self.on_ready is not None:
                    self.on_ready(self._generation)
                self._kick_ops()
            return
        # A channel reopened on a live connection.
        if name == "pub":
            parked, self._pub_parked = self._pub_parked, []
            for batch in parked:
                self._io_publish(batch)
        op = self._op
        if op is not None and op.waiting == name:
            self._issue(op)

    def _conn_desc(self) -> str:
        try:
            params = self._conn.params
            return f"{params.host}:{params.port}"
        except AttributeError:  # pragma: no cover
            return self.where

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self._blocked = True
        log.warning("%s: RabbitMQ blocks publishing (resource alarm)", self.name)

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self._blocked = False
        log.info("%s: RabbitMQ accepts publishing again", self.name)

    def _on_channel_closed(self, name: str, channel: Any, reason: BaseException) -> None:
        chan = self._chans[name]
        if chan.channel is not channel:
            return
        chan.channel = None
        was_open = chan.open
        chan.open = False
        conn = self._conn
        if self._closing or conn is None or not conn.is_open:
            return  # the connection-level handler deals with everything
        error = translate_error(reason, f"{name} channel")
        if name == "pub":
            self._fail_unconfirmed(_LinkDown(error))
        elif name == "con" and was_open:
            log.warning(
                "%s: consume channel closed: %s (deliveries held on it return)", self.name, error
            )
            if self.on_channel_reset is not None:
                self.on_channel_reset(name, chan.epoch)
        op = self._op
        if op is not None and op.pending is not None and op.pending.channel == name:
            op.pending = None
            op.waiting = None
            self._advance(op, None, error)
        self._open_channel(name)

    def _on_cancel(self, frame: Any) -> None:
        tag = frame.method.consumer_tag
        if self.on_consumer_cancelled is not None:
            self.on_consumer_cancelled(tag)

    def _on_connection_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        for chan in self._chans.values():
            chan.channel = None
            chan.open = False
        self._cancel_tick()
        if self._closing:
            self._ioloop.stop()
            return
        error = translate_error(reason, f"connection to {self.where}")
        was_open = self._state == _OPEN
        with self._cond:
            self._last_error = error
            if self._state != _CLOSED:
                self._state = _DOWN
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._cond.notify_all()
        self._fail_everything(_LinkDown(error))
        if self.on_lost is not None:
            self.on_lost()
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.options.max_retry_interval)
        log.warning(
            "%s: connection %s: %s; reconnecting in %.1fs",
            self.name,
            "lost" if was_open else "failed",
            error,
            delay,
        )
        self._retry_handle = self._ioloop.call_later(delay, self._connect)

    def _fail_everything(self, error: BaseException) -> None:
        self._fail_unconfirmed(error)
        with self._pub_lock:
            queued = list(self._pub_queue)
            self._pub_queue.clear()
        for batch in queued:
            batch.fail(error)
        for batch in self._pub_parked:
            batch.fail(error)
        self._pub_parked = []
        ops = list(self._ops)
        self._ops.clear()
        current, self._op = self._op, None
        if current is not None:
            ops.insert(0, current)
        for op in ops:
            if not op.future.done():
                op.future.set_exception(error)
            op.gen.close()

    def _fail_unconfirmed(self, error: BaseException) -> None:
        pending, self._unconfirmed = self._unconfirmed, OrderedDict()
        for batch, _index in pending.values():
            batch.fail(error)

    def _io_close(self) -> None:
        self._closing = True
        self._cancel_tick()
        if self._retry_handle is not None:
            self._ioloop.remove_timeout(self._retry_handle)
            self._retry_handle = None
        self._fail_everything(ConnectionLost(f"{self.name} is closed"))
        if self._workflow is not None:
            with contextlib.suppress(Exception):  # already finished: nothing to abort
                self._workflow.abort()
        conn = self._conn
        if conn is not None and not conn.is_closed and not conn.is_closing:
            conn.close()
            # Do not wait forever for a server that stopped answering.
            self._ioloop.call_later(2.0, self._ioloop.stop)
        else:
            self._ioloop.stop()

    def _schedule_tick(self) -> None:
        if self.tick_interval is None or self.on_tick is None:
            return
        self._tick_handle = self._ioloop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        if self._state != _OPEN or self._closing:
            return
        try:
            if self.on_tick is not None:
                self.on_tick()
        finally:
            self._schedule_tick()

    def _cancel_tick(self) -> None:
        if self._tick_handle is not None:
            self._ioloop.remove_timeout(self._tick_handle)
            self._tick_handle = None

    # ------------------------------------------------------------------ I/O thread: channels
    def channel(self, name: str) -> Any:
        """The open pika channel ``name``, or None (I/O thread only)."""
        chan = self._chans[name]
        return chan.channel if chan.open else None

    def epoch(self, name: str) -> int:
        """How many times channel ``name`` was opened; receipts compare it (I/O thread)."""
        return self._chans[name].epoch

    def channel_open(self, name: str) -> bool:
        return self._chans[name].open

    # ------------------------------------------------------------------ I/O thread: ops
    def _kick_ops(self) -> None:
        while self._op is None and self._ops and self._state == _OPEN:
            op = self._ops.popleft()
            if op.abandoned or op.future.done():
                op.gen.close()
                continue
            self._op = op
            self._advance(op, None, None)

    def _advance(self, op: _OpState, value: Any, error: BaseException | None) -> None:
        try:
            item = op.gen.throw(error) if error is not None else op.gen.send(value)
        except StopIteration as stop:
            self._finish(op, stop.value, None)
            return
        except BaseException as exc:
            self._finish(op, None, exc)
            return
        op.pending = item
        self._issue(op)

    def _issue(self, op: _OpState) -> None:
        item = op.pending
        if item is None:  # pragma: no cover - defensive
            return
        channel = self.channel(item.channel)
        if channel is None:
            op.waiting = item.channel  # resumed by _ready() once it reopens
            return
        op.waiting = None
        token = op.token = next(self._tokens)

        def reply(frame: Any) -> None:
            if self._op is op and op.token == token and op.pending is item:
                op.pending = None
                self._advance(op, frame, None)

        try:
            item.start(channel, reply)
        except Exception as exc:
            op.pending = None
            self._advance(op, None, translate_error(exc, f"{item.channel} channel"))

    def _finish(self, op: _OpState, result: Any, error: BaseException | None) -> None:
        if self._op is op:
            self._op = None
        if not op.future.done():
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)
        self._ioloop.add_callback_threadsafe(self._kick_ops)

    # ------------------------------------------------------------------ I/O thread: publish
    def _drain_batches(self) -> None:
        while True:
            with self._pub_lock:
                if not self._pub_queue:
                    self._pub_wake = False
                    return
                batch = self._pub_queue.popleft()
            self._io_publish(batch)

    def _io_publish(self, batch: _PubBatch) -> None:
        if batch.abandoned or batch.done.is_set():
            return
        if self._state != _OPEN:
            batch.fail(_LinkDown(self._down_error()))
            return
        channel = self.channel("pub")
        if channel is None:
            self._pub_parked.append(batch)  # the publish channel is reopening
            return
        # The header frame must fit in one frame: RabbitMQ closes the CONNECTION over a
        # bigger one (every held delivery lost, the publish retried forever as transient).
        room = int(getattr(self._conn.params, "frame_max", 0) or 131_072) - _HEADER_OVERHEAD
        for index, (exchange, key, body, properties) in enumerate(batch.entries):
            if batch.confirmed[index]:
                continue
            try:
                if isinstance(properties, Properties):
                    size = sum(map(len, properties.encode()))
                    if size > room:
                        raise ValueError(
                            f"its properties take {size} bytes, more than RabbitMQ's "
                            f"frame_max allows ({room}): make its headers smaller"
                        )
                channel.basic_publish(exchange, key, body, properties)
            except (
                pika.exceptions.UnsupportedAMQPFieldException,
                pika.exceptions.ShortStringTooLong,
                TypeError,
                ValueError,
                OverflowError,
                RecursionError,
                struct.error,
            ) as exc:
                batch.fail(EncodeError(f"message cannot be sent over AMQP: {_said(exc)}"))
                return
            except pika.exceptions.AMQPError as exc:
                batch.fail(_LinkDown(translate_error(exc, "publish")))
                return
            self._pub_seq += 1
            self._unconfirmed[self._pub_seq] = (batch, index)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        acked = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            done = []
            while self._unconfirmed:
                first = next(iter(self._unconfirmed))
                if first > tag:
                    break
                done.append(self._unconfirmed.popitem(last=False)[1])
        else:
            entry = self._unconfirmed.pop(tag, None)
            done = [entry] if entry is not None else []
        for batch, index in done:
            if acked:
                batch.ack(index)
            else:
                batch.fail(
                    _Nacked(
                        "RabbitMQ refused a published message (basic.nack): it was not accepted"
                    )
                )


# ============================================================================== the broker

_BUFFERED, _HELD, _SETTLING, _SETTLED, _LOST = range(5)


class _Consumer:
    __slots__ = ("active", "outstanding", "prefetch", "queue", "tag")

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.tag = ""
        self.active = False
        self.outstanding = 0  # delivered to this consumer and not settled

    @property
    def credit(self) -> int:
        return self.prefetch - self.outstanding if self.active else 0


class _Receipt:
    """Broker-private handle of one delivery (``Delivery.receipt``)."""

    __slots__ = (
        "broker",
        "consumer",
        "deadline",
        "epoch",
        "queue",
        "received",
        "special",
        "state",
        "tag",
    )

    def __init__(self, broker: AMQPBroker, consumer: _Consumer, epoch: int, tag: int) -> None:
        self.broker = broker
        self.consumer = consumer
        self.epoch = epoch
        self.tag = tag
        self.queue = consumer.queue
        self.state = _BUFFERED
        self.deadline = 0.0
        self.received = 0.0
        self.special: _Special | None = None  # set on the rare deliveries receive() handles

    def __repr__(self) -> str:
        return f"<AMQP receipt tag={self.tag} epoch={self.epoch} queue={self.queue!r}>"


class _Special:
    """Why receive() must handle a buffered delivery itself instead of handing it out.

    ``reason`` set: the message cannot be decoded (dead-letter a stand-in). Otherwise a
    redelivery on a classic queue whose count must be carried by a copy (``prior``: the
    deliveries its headers recorded before this one's).
    """

    __slots__ = ("body", "prior", "properties", "reason")

    def __init__(self, properties: Any, body: bytes, reason: str = "", prior: int = 0) -> None:
        self.properties = properties
        self.body = body
        self.reason = reason
        self.prior = prior


def _plain(value: Any) -> Any:
    """pika decodes 64-bit integers as a private ``int`` subclass; make values plain.

    Raises:
        DecodeError: a key that is not text (pika keeps invalid UTF-8 as bytes) or a table
            pika could not decode (see :func:`_fix_pika_decoding`).
    """
    kind = type(value)
    if kind is dict:
        if _UNDECODABLE_TABLE in value:
            raise DecodeError(f"AMQP field table: {value[_UNDECODABLE_TABLE]}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise DecodeError(f"AMQP field table key {k!r:.60} is not UTF-8 text")
            out[k] = _plain(v)
        return out
    if kind is list:
        return [_plain(v) for v in value]
    if kind is not int and kind is not bool and isinstance(value, int):
        return int(value)
    return value


def _stand_in_envelope(properties: Any, body: bytes) -> Envelope:
    """What an undecodable delivery looks like until receive() dead-letters it (never
    handed out: only its priority and id are used, for ordering and logs)."""
    message_id = getattr(properties, "message_id", None)
    ident = message_id if type(message_id) is str else hashlib.sha256(body).hexdigest()[:32]
    return Envelope(id=ident, body=body, content_type=UNDECODABLE_CONTENT_TYPE)


def _bytes_fields(properties: Any) -> str:
    names = ("message_id", "correlation_id", "reply_to", "content_type", "content_encoding")
    return ", ".join(
        f"{name}={getattr(properties, name)!r:.60}"
        for name in names
        if type(getattr(properties, name)) is bytes
    )


def _describe(properties: Any) -> str:
    """The properties of an undecodable message as text, for the stand-in's
    :data:`ORIGINAL_HEADER` (bounded: the stand-in must fit in RabbitMQ's frame_max)."""
    fields = {}
    for name in (
        "content_type", "content_encoding", "headers", "delivery_mode", "priority",
        "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
        "user_id", "app_id", "cluster_id",
    ):  # fmt: skip
        value = getattr(properties, name, None)
        if value is not None:
            fields[name] = value
    return clean_text(repr(fields), MAX_ORIGINAL_CHARS)


def _strip_delay_deaths(headers: dict[str, Any]) -> None:
    """Remove the dead-lettering records the delay hops added (they are not the sender's)."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return
    kept = [
        d
        for d in deaths
        if not (
            isinstance(d, dict)
            and str(d.get("exchange", "")).startswith(DELAY_EXCHANGE_PREFIX)
            and d.get("reason") == "expired"
        )
    ]
    if len(kept) == len(deaths):
        return
    if kept:
        headers["x-death"] = kept
        for key in _DEATH_SUMMARY_KEYS:
            if str(headers.get(key, "")).startswith(DELAY_EXCHANGE_PREFIX):
                headers.pop(key, None)
    else:
        headers.pop("x-death", None)
        for key in _DEATH_SUMMARY_KEYS:
            headers.pop(key, None)


def _target_token(queue: str) -> str:
    """One topic word naming ``queue`` in delay routing keys (queue names may hold dots)."""
    return hashlib.sha256(queue.encode("utf-8")).hexdigest()[:24]


def delay_queue_name(queue: str, level: int) -> str:
    """The TTL queue holding ``queue``'s delayed messages at ``level``."""
    name = f"{queue}{_DELAY_QUEUE_INFIX}{level}"
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = f"conveyor.delay.{_target_token(queue)}.{level}"
    return name


def _delay_exchange(level: int) -> str:
    return _DELIVER_EXCHANGE if level < 0 else f"{DELAY_EXCHANGE_PREFIX}{level}"


def _delay_units(delay: float) -> int:
    units = math.ceil(delay / DELAY_RESOLUTION - 1e-9)
    if units >= 2**DELAY_LEVELS:
        raise ConfigurationError(
            f"delay {delay:g}s is longer than the longest supported delay ({MAX_DELAY:.0f}s)"
        )
    return max(units, 1)


def _routing_key(units: int, token: str) -> str:
    bits = format(units, f"0{DELAY_LEVELS}b")
    return ".".join(bits) + "." + token


def _pattern(level: int, bit: str, tail: str) -> str:
    """Topic pattern matching ``bit`` at ``level`` (any bits above), then ``tail``."""
    return "*." * (DELAY_LEVELS - 1 - level) + bit + "." + tail


class AMQPBroker(BrokerBase):
    """RabbitMQ broker on pika; see the module docstring for semantics.

    Args:
        endpoints: hosts in failover order (:func:`parse_amqp_url`).
        options: :class:`AMQPBrokerOptions`; defaults when None. ``max_priority`` needs
            :class:`AMQPPriorityBroker` (which :meth:`from_url` picks for you).
        url: the URL, for ``repr`` (password masked).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.LEASE_EXTENSION,
            Capability.DELAYED_DELIVERY,
            Capability.DEAD_LETTER,
            Capability.QUEUE_SIZE,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        endpoints: Sequence[AMQPEndpoint],
        options: AMQPBrokerOptions | None = None,
        *,
        url: str = "",
    ) -> None:
        self.options = options or AMQPBrokerOptions()
        wants_priority = Capability.PRIORITY in self.capabilities
        if wants_priority != (self.options.max_priority is not None):
            raise ConfigurationError(
                "max_priority needs AMQPPriorityBroker (AMQPBroker.from_url picks it)"
                if not wants_priority
                else "AMQPPriorityBroker needs the max_priority option"
            )
        self.url = url or ";".join(str(e) for e in endpoints)
        tick = min(1.0, max(0.05, self.options.lease_seconds / 10))
        self._link = AMQPLink(
            endpoints, self.options, name="conveyor-amqp-broker", url=self.url, tick_interval=tick
        )
        self._link.on_ready = self._on_ready
        self._link.on_lost = self._on_lost
        self._link.on_channel_reset = self._on_channel_reset
        self._link.on_consumer_cancelled = self._on_consumer_cancelled
        self._link.on_tick = self._expire_leases
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._seq = itertools.count()
        # Guarded by _cond (shared with the I/O thread).
        self._buffers: dict[str, list[tuple[int, int, Delivery]]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._held: set[_Receipt] = set()
        self._declared_gen = 0
        self._declared: set[str] = set()
        self._delay_ready: set[tuple[str, int]] = set()
        self._delay_base_ready = False
        self._known: set[str] = set()
        self._warned_timeout: set[int] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_url(cls, url: str, **options: Any) -> AMQPBroker:
        """Build a broker from an AMQP URL; options override the URL's query.

        Does not connect: the first operation does (and fails fast if RabbitMQ cannot be
        reached). Returns an :class:`AMQPPriorityBroker` when ``max_priority`` is set.

        Raises:
            InvalidURL: not an AMQP URL.
            ConfigurationError: unknown option or bad value.
        """
        endpoints, query = parse_amqp_url(url)
        opts = build_options(AMQPBrokerOptions, query, options, owner="amqp broker")
        chosen: type[AMQPBroker] = AMQPPriorityBroker if opts.max_priority else AMQPBroker
        if cls is AMQPPriorityBroker and chosen is not AMQPPriorityBroker:
            raise ConfigurationError("AMQPPriorityBroker needs the max_priority option")
        return chosen(endpoints, opts, url=url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)!r}>"

    @property
    def link(self) -> AMQPLink:
        """The connection this broker owns (for tests and diagnostics)."""
        return self._link

    def _deadline(self) -> float:
        return time.monotonic() + self.options.operation_timeout

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    # ------------------------------------------------------------------ link hooks (I/O)
    def _on_ready(self, generation: int) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_lost(self) -> None:
        self._drop_deliveries(None)

    def _on_channel_reset(self, name: str, old_epoch: int) -> None:
        if name == "con":
            self._drop_deliveries(old_epoch)

    def _drop_deliveries(self, epoch: int | None) -> None:
        """The consume channel (or the connection) is gone: RabbitMQ requeued everything it
        delivered there, so every receipt of it is lost and buffers are void."""
        with self._cond:
            for receipts in self._buffers.values():
                for _p, _s, delivery in receipts:
                    delivery.receipt.state = _LOST
            self._buffers.clear()
            for receipt in self._held:
                receipt.state = _LOST
            self._held.clear()
            self._consumers.clear()
            self._cond.notify_all()

    def _on_consumer_cancelled(self, tag: str) -> None:
        with self._cond:
            for consumer in self._consumers.values():
                if consumer.tag == tag:
                    consumer.active = False

    # ------------------------------------------------------------------ queues
    def declare_queue(self, name: str) -> None:
        """Declare exchange ``name`` (direct, durable), queue ``name`` (durable, Celery's
        arguments) and the binding, as Celery does. Idempotent; cached per connection.

        Raises:
            ConfigurationError: bad name, or RabbitMQ has the queue with other arguments
                (406 PRECONDITION_FAILED: compare with the Celery side's settings).
            ConnectionLost: RabbitMQ cannot be reached; the broker is closed.
        """
        self._check_open()
        _check_name(name)
        self._ensure_queues([name], self._deadline())

    def dead_letter_queue(self, queue: str) -> str:
        """``queue + ".dead"``: an ordinary queue (receive, ack, purge and size work)."""
        return f"{queue}{DEAD_LETTER_SUFFIX}"

    def _queue_arguments(self, name: str) -> dict[str, Any]:
        opts = self.options
        args: dict[str, Any] = {}
        if opts.max_priority is not None:
            args["x-max-priority"] = opts.max_priority
        if opts.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if opts.delivery_limit is not None:
                args["x-delivery-limit"] = opts.delivery_limit
        if self._uses_dlx(name):
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.dead_letter_queue(name)
        return args

    def _uses_dlx(self, name: str) -> bool:
        # Dead-letter queues are terminal for RabbitMQ's DLX (no q.dead.dead chain of
        # declarations); rejecting from one falls back to the publish method.
        return self.options.dead_letter == "dlx" and not name.endswith(DEAD_LETTER_SUFFIX)

    def _fresh_cache(self) -> None:
        """Forget what was declared on an earlier connection (caller holds _cond)."""
        generation = self._link.generation
        if generation != self._declared_gen:
            self._declared_gen = generation
            self._declared.clear()
            self._delay_ready.clear()
            self._delay_base_ready = False

    def _ensure_queues(self, names: Sequence[str], deadline: float) -> None:
        self._link.await_open(deadline)
        with self._cond:
            self._fresh_cache()
            missing = [n for n in dict.fromkeys(names) if n not in self._declared]
        if missing:
            self._link.run_op_retrying(lambda: self._op_declare(missing), deadline)

    def _op_declare(self, names: Sequence[str]) -> Op[None]:
        generation = self._link.generation
        for name in names:
            if self._uses_dlx(name):
                yield from self._declare_steps(self.dead_letter_queue(name))
            yield from self._declare_steps(name)
        with self._cond:
            if self._declared_gen == generation:
                for name in names:
                    self._declared.add(name)
                    if self._uses_dlx(name):
                        self._declared.add(self.dead_letter_queue(name))

    def _declare_steps(self, name: str) -> Op[None]:
        args = self._queue_arguments(name)
        yield rpc("adm", "exchange_declare", name, "direct", durable=True)
        yield rpc("adm", "queue_declare", name, durable=True, arguments=args)
        yield rpc("adm", "queue_bind", name, name, routing_key=name)
        with self._cond:
            self._known.add(name)

    # ------------------------------------------------------------------ delayed topology
    def _ensure_delay(self, queue: str, levels: Sequence[int], deadline: float) -> None:
        self._link.await_open(deadline)
        with self._cond:
            self._fresh_cache()
            base = self._delay_base_ready
            missing = [lv for lv in levels if (queue, lv) not in self._delay_ready]
        if base and not missing:
            return
        self._link.run_op_retrying(lambda: self._op_delay(queue, missing, not base), deadline)

    def _op_delay(self, queue: str, levels: Sequence[int], base: bool) -> Op[None]:
        generation = self._link.generation
        if base:
            for level in range(-1, DELAY_LEVELS):
                exchange = _delay_exchange(level)
                yield fire("adm", "exchange_declare", exchange, "topic", durable=True)
            for level in range(DELAY_LEVELS):
                # A zero bit at this level passes the message on to the next level down.
                source, destination = _delay_exchange(level), _delay_exchange(level - 1)
                key = _pattern(level, "0", "#")
                yield fire("adm", "exchange_bind", destination, source, routing_key=key)
        token = _target_token(queue)
        if levels:
            # The last hop: from the deliver exchange into the target queue.
            yield fire("adm", "queue_bind", queue, _DELIVER_EXCHANGE, routing_key="#." + token)
        for level in levels:
            name = delay_queue_name(queue, level)
            args: dict[str, Any] = {
                "x-message-ttl": round(DELAY_RESOLUTION * 1000) * 2**level,
                "x-dead-letter-exchange": _delay_exchange(level - 1),
            }
            if self.options.queue_type == "quorum":
                args["x-queue-type"] = "quorum"
            key = _pattern(level, "1", "*." * level + token)
            yield fire("adm", "queue_declare", name, durable=True, arguments=args)
            yield fire("adm", "queue_bind", name, _delay_exchange(level), routing_key=key)
            with self._cond:
                self._known.add(name)
        # One awaited step: every pipelined one before it succeeded if this one returns.
        yield rpc("adm", "exchange_declare", _DELIVER_EXCHANGE, passive=True)
        with self._cond:
            if self._declared_gen == generation:
                self._delay_base_ready = True
                self._delay_ready.update((queue, lv) for lv in levels)

    # ------------------------------------------------------------------ publish
    def _properties(self, envelope: Envelope, headers: Mapping[str, Any] | None = None) -> Any:
        hdrs = dict(envelope.headers if headers is None else headers)
        # Celery sends no message_id: the task id travels in the `id` header and
        # correlation_id. Only envelopes whose id is neither carry it as message_id.
        message_id = None if hdrs.get("id") == envelope.id else envelope.id
        return Properties(
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            headers=hdrs,
            delivery_mode=2,
            priority=envelope.priority,
            correlation_id=envelope.correlation_id,
            reply_to=envelope.reply_to,
            message_id=message_id,
        )

    def _route(self, queue: str, delay: float | None, deadline: float) -> tuple[str, str]:
        """Declare what a publish to ``queue`` needs; return (exchange, routing key)."""
        if not delay or delay <= 0:
            self._ensure_queues([queue], deadline)
            return "", queue
        check_delay(delay, MAX_DELAY, "the AMQP broker", _DELAY_WHY)
        units = _delay_units(delay)
        levels = [lv for lv in range(DELAY_LEVELS) if units >> lv & 1]
        self._ensure_queues([queue], deadline)
        self._ensure_delay(queue, levels, deadline)
        return _delay_exchange(max(levels)), _routing_key(units, _target_token(queue))

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Publish and wait for RabbitMQ's confirm (declaring the queue on first use).

        Blocks for one round trip (shared with concurrent publishers). A delayed message is
        routed into the delay levels and stays in RabbitMQ until due.

        Raises:
            UnsupportedFeature: priority > 0 on :class:`AMQPBroker` (use ``max_priority``).
            ConfigurationError: bad queue, priority or delay; inequivalent queue in RabbitMQ.
            EncodeError: a header value AMQP field tables cannot carry, or a body over
                ``max_message_size`` (nothing of the batch is sent).
            OperationalError: not confirmed within ``operation_timeout``.
            ConnectionLost: the broker is closed or RabbitMQ unreachable.
        """
        self.publish_many([envelope], queue=queue, delay=delay)

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Publish every envelope, then wait once for all confirms.

        Returns:
            How many were published (all of them; on error, a prefix or none may be in).
        """
        self._check_open()
        _check_name(queue)
        batch = list(envelopes)
        limit = self.options.max_message_size
        for envelope in batch:
            self._check_publish(envelope, delay)
            check_message_size(envelope.body, limit, f"message {envelope.id}")
        if not batch:
            return 0
        deadline = self._deadline()
        exchange, key = self._route(queue, delay, deadline)
        entries = [(exchange, key, e.body, self._properties(e)) for e in batch]
        self._link.publish(entries, deadline)
        return len(batch)

    # ------------------------------------------------------------------ receive
    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Hand out up to ``max_messages`` deliveries, each held under a lease.

        Starts (or resumes) a consumer per queue, then waits up to ``timeout`` seconds for
        the first delivery. Order: higher priority first, then the order of ``queues``, then
        arrival. While the connection is down it waits for the reconnect within ``timeout``
        and returns ``[]``; it raises once the outage outlasts ``operation_timeout``.

        Raises:
            ConfigurationError: no queue, a bad name, ``max_messages`` < 1, ``timeout`` < 0.
            ConnectionLost: the broker is closed, never connected, or a long outage.
        """
        self._check_open()
        names = self._queue_list(queues)
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages!r}")
        if timeout is None or not timeout >= 0:
            raise ConfigurationError(f"timeout must be >= 0 seconds, got {timeout!r}")
        start = time.monotonic()
        deadline = start + timeout
        got = self._screen(self._take(names, max_messages))
        if got:
            return got
        op_timeout = self.options.operation_timeout
        try:
            # A first connection may take its time; a reconnect is waited for only as long
            # as this call may block.
            self._link.await_open(deadline if self._link.ever_connected else start + op_timeout)
            if self._needs_consumers(names):
                op_deadline = time.monotonic() + op_timeout
                self._ensure_queues(names, op_deadline)
                prefetch = min(self.options.prefetch_count or max_messages, _MAX_PREFETCH)
                self._link.run_op(self._op_consume(names, prefetch), op_deadline)
        except _LinkDown:
            return []  # dropped meanwhile: the next call waits for the reconnect
        except ConnectionLost:
            link = self._link
            if self._closed or not link.ever_connected or link.down_for() > op_timeout:
                raise
            return []
        while True:
            with self._cond:
                while True:
                    got = self._take_locked(names, max_messages)
                    remaining = deadline - time.monotonic()
                    if got or remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
            got = self._screen(got)
            if got or deadline <= time.monotonic() or self._closed:
                break
        if not got:
            self._check_open()
        return got

    # ------------------------------------------------------------------ special deliveries
    def _screen(self, got: list[Delivery]) -> list[Delivery]:
        """Handle the taken deliveries that must not be handed out (``_Special``); return the
        others. Costs one pass over the batch when there are none."""
        if not got or all(d.receipt.special is None for d in got):
            return got
        kept = []
        for delivery in got:
            special: _Special | None = delivery.receipt.special
            if special is None:
                kept.append(delivery)
            else:
                try:
                    if special.reason:
                        self._dead_letter_undecodable(delivery, special)
                    elif self._recount(delivery, special):
                        kept.append(delivery)  # uncounted this once (see _recount)
                except Exception:  # never out of receive(): RabbitMQ has it back at worst
                    log.exception("handling a delivery of %r failed", delivery.queue)
                    self._settle_quietly(delivery, "requeue")
        return kept

    def _recount(self, delivery: Delivery, special: _Special) -> bool:
        """A redelivery from a classic queue (no ``x-delivery-count``): publish a copy whose
        :data:`DELIVERIES_HEADER` counts this delivery's predecessor, wait for its confirm,
        then ack the original. The count thus lives in RabbitMQ and survives any consumer's
        death; a crash between confirm and ack leaves a duplicate, never a loss."""
        props = special.properties
        headers = dict(props.headers or {})
        headers[DELIVERIES_HEADER] = special.prior + 1
        copy = Properties(
            headers=headers,
            **{name: getattr(props, name) for name in _COPIED_PROPERTIES},
        )
        entry = ("", delivery.queue, special.body, copy)
        try:
            self._link.publish([entry], self._deadline())
        except _Nacked as exc:
            # The queue takes no publish now (full, reject-publish): requeueing would spin on
            # it. Hand it out uncounted this once.
            log.warning("cannot count a redelivery of %r now: %s", delivery.queue, _said(exc))
            delivery.receipt.special = None
            return True
        except OperationalError as exc:
            log.warning("could not re-publish a redelivery of %r to count it (given back "
                        "to RabbitMQ): %s", delivery.queue, _said(exc))  # fmt: skip
            self._settle_quietly(delivery, "requeue")
        except ConveyorError as exc:
            # Its headers cannot take the count (frame_max): handed out, it could loop without
            # limit, so it goes to the dead letters (a copy without its headers, if need be).
            reason = clean_reason(f"its deliveries cannot be counted: {exc}")
            log.error("dead-lettering a message of %r: %s", delivery.queue, reason)
            with contextlib.suppress(InvalidReceipt, ConnectionLost, OperationalError):
                self.reject(delivery, requeue=False, reason=reason)
        else:
            self._ack_processed(delivery)
        return False

    def _dead_letter_undecodable(self, delivery: Delivery, special: _Special) -> None:
        """Publish the well-formed stand-in of an undecodable message to ``<queue>.dead``
        (its body, the reason, its properties as text), then ack it. Never raises."""
        queue = delivery.queue
        log.error("dead-lettering a message of %r: %s", queue, special.reason)
        headers = {
            DEAD_LETTER_REASON_HEADER: special.reason,
            DEAD_LETTER_SOURCE_HEADER: queue,
            ORIGINAL_HEADER: _describe(special.properties),
        }
        stand_in = Envelope(
            id=delivery.envelope.id,
            body=special.body,
            content_type=UNDECODABLE_CONTENT_TYPE,
            content_encoding="binary",
            headers=headers,
        )
        try:
            self._publish_copy(stand_in, self.dead_letter_queue(queue))
        except OperationalError as exc:
            log.warning("could not dead-letter it now (given back to RabbitMQ): %s", _said(exc))
            self._settle_quietly(delivery, "requeue")
            return
        except ConveyorError as exc:  # a dead-letter queue name RabbitMQ cannot take
            log.error("could not dead-letter it: %s; it is dropped", _said(exc))
        self._settle_quietly(delivery, "ack")

    def _ack_processed(self, delivery: Delivery) -> None:
        """Ack the original of a counted copy and wait until RabbitMQ has PROCESSED the ack
        (a synchronous method on the same channel is answered after it), before anything
        else is handed out: the copy may be the next delivery, and a task that kills its
        process must not find the original still unacked (a duplicate per crash). Never
        raises: if the channel closed, RabbitMQ delivers the original again (a duplicate)."""
        receipt: _Receipt = delivery.receipt
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
        try:
            self._send_settle(receipt, delivery, "ack")
            prefetch = max(1, receipt.consumer.prefetch)
            op = self._op_barrier(prefetch)
            self._link.run_op(op, self._deadline())
        except (ConveyorError, _LinkDown) as exc:
            log.info("ack of a counted redelivery not confirmed: %s", _said(exc))

    @staticmethod
    def _op_barrier(prefetch: int) -> Op[None]:
        # basic.qos with the consumer's own prefetch changes nothing (it applies to consumers
        # started later) and is answered in order with the channel's other frames.
        yield rpc("con", "basic_qos", prefetch_count=prefetch)

    def _settle_quietly(self, delivery: Delivery, action: str) -> None:
        """ack or requeue a delivery receive() handled itself; a lost lease (the channel
        closed meanwhile: RabbitMQ has it back already) is no error here."""
        with contextlib.suppress(InvalidReceipt, OperationalError):
            if action == "ack":
                self.ack(delivery)
            else:
                self.reject(delivery, requeue=True)

    def _needs_consumers(self, names: Sequence[str]) -> bool:
        with self._cond:
            self._fresh_cache()
            for name in names:
                consumer = self._consumers.get(name)
                if name not in self._declared or consumer is None or not consumer.active:
                    return True
                if consumer.credit <= 0 and not self._buffers.get(name):
                    return True
        return False

    def _op_consume(self, names: Sequence[str], prefetch: int) -> Op[None]:
        link = self._link
        for name in names:
            with self._cond:
                consumer = self._consumers.get(name)
                has_room = consumer.credit > 0 if consumer is not None else False
                if has_room or (
                    consumer is not None and consumer.active and self._buffers.get(name)
                ):
                    continue
            if consumer is not None and consumer.active:
                # Full: nothing can be in flight to it, so cancelling loses nothing. Its
                # held deliveries stay valid (delivery tags belong to the channel).
                consumer.active = False
                old_tag = consumer.tag
                yield rpc("con", "basic_cancel", old_tag)
            fresh = _Consumer(name, prefetch)
            epoch = link.epoch("con")
            yield rpc("con", "basic_qos", prefetch_count=prefetch)

            def start(
                ch: Any, cb: Callable[[Any], None], c: _Consumer = fresh, e: int = epoch
            ) -> None:
                def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                    self._on_message(c, e, method, props, body)

                c.tag = ch.basic_consume(c.queue, on_message_callback=on_message, callback=cb)

            yield _Rpc("con", start)
            with self._cond:
                if link.epoch("con") == epoch and link.channel_open("con"):
                    fresh.active = True
                    self._consumers[name] = fresh
                    self._cond.notify_all()

    def _on_message(
        self, consumer: _Consumer, epoch: int, method: Any, properties: Any, body: bytes
    ) -> None:
        """I/O thread: one delivery arrived; buffer it. Never raises (an exception here would
        drop the connection, and RabbitMQ would redeliver the same message forever)."""
        if epoch != self._link.epoch("con"):
            return  # a late frame of a closed channel (cannot be acked anyway)
        receipt = _Receipt(self, consumer, epoch, method.delivery_tag)
        redelivered = bool(method.redelivered)
        try:
            envelope, count, prior = self._envelope(properties, body)
            if redelivered and self.options.queue_type != "quorum":
                # A classic queue does not count deliveries: receive() carries the count in
                # a copy (see _recount). Never on the first delivery of a message.
                receipt.special = _Special(properties, bytes(body), prior=prior)
                count = None
            redelivered = redelivered or prior > 0
        except Exception as exc:  # any shape of bad message: dead-letter it in receive()
            receipt.special = _Special(properties, bytes(body), reason=undecodable_reason(exc))
            envelope, count = _stand_in_envelope(properties, bytes(body)), None
        delivery = Delivery(
            envelope=envelope,
            queue=consumer.queue,
            receipt=receipt,
            redelivered=redelivered,
            delivery_count=count,
        )
        with self._cond:
            consumer.outstanding += 1
            heapq.heappush(
                self._buffers.setdefault(consumer.queue, []),
                (-envelope.priority, next(self._seq), delivery),
            )
            self._cond.notify_all()

    def _envelope(self, properties: Any, body: bytes) -> tuple[Envelope, int | None, int]:
        """``(envelope, delivery_count, prior)``: ``prior`` is the count conveyor's own header
        carries (classic queues); ``delivery_count`` is None for a classic redelivery.

        Raises:
            DecodeError: (or any exception) the properties are not a message conveyor can
                hand out.
        """
        raw_headers = properties.headers
        if raw_headers is not None and type(raw_headers) is not dict:
            raise DecodeError("AMQP headers are not a field table")
        headers = _plain(raw_headers) if raw_headers else {}
        returned = headers.pop("x-delivery-count", None)
        recorded = headers.pop(DELIVERIES_HEADER, None)
        _strip_delay_deaths(headers)
        prior = 0
        count: int | None
        if self.options.queue_type == "quorum":
            count = int(returned) + 1 if isinstance(returned, int) else 1
        else:
            if type(recorded) is int and recorded > 0:
                prior = min(recorded, _MAX_COUNT)  # so prior + 1 always fits its header
            count = prior + 1
        message_id = properties.message_id
        correlation_id = properties.correlation_id
        reply_to = properties.reply_to
        content_type = properties.content_type
        encoding = properties.content_encoding
        # pika gives a short string it cannot decode as UTF-8 as bytes (else str or None).
        if (
            type(message_id) is bytes
            or type(correlation_id) is bytes
            or type(reply_to) is bytes
            or type(content_type) is bytes
            or type(encoding) is bytes
        ):
            raise DecodeError(
                f"AMQP properties that are not UTF-8 text: {_bytes_fields(properties)}"
            )
        header_id = headers.get("id")
        envelope_id = (
            message_id
            or (header_id if isinstance(header_id, str) and header_id else None)
            or correlation_id
            or hashlib.sha256(bytes(body)).hexdigest()[:32]
        )
        envelope = Envelope(
            id=envelope_id,
            body=bytes(body),
            content_type=content_type or "",
            content_encoding=encoding or "",
            headers=headers,
            priority=min(int(properties.priority or 0), 9),  # AMQP allows 0-255; conveyor 0-9
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        return envelope, count, prior

    def _take(self, names: Sequence[str], limit: int) -> list[Delivery]:
        with self._cond:
            return self._take_locked(names, limit)

    def _take_locked(self, names: Sequence[str], limit: int) -> list[Delivery]:
        got: list[Delivery] = []
        now = time.monotonic()
        lease = self.options.lease_seconds
        while len(got) < limit:
            best: tuple[int, int, int] | None = None
            best_name = ""
            for index, name in enumerate(names):
                buffer = self._buffers.get(name)
                if buffer:
                    priority, seq, _d = buffer[0]
                    key = (priority, index, seq)
                    if best is None or key < best:
                        best, best_name = key, name
            if best is None:
                break
            _p, _s, delivery = heapq.heappop(self._buffers[best_name])
            receipt: _Receipt = delivery.receipt
            if receipt.state != _BUFFERED:
                continue
            receipt.state = _HELD
            receipt.received = now
            receipt.deadline = now + lease
            self._held.add(receipt)
            got.append(delivery)
        return got

    # ------------------------------------------------------------------ settle
    def _receipt(self, delivery: Delivery) -> _Receipt:
        self._check_open()
        receipt = delivery.receipt
        if not isinstance(receipt, _Receipt) or receipt.broker is not self:
            raise InvalidReceipt(f"delivery {delivery.envelope.id!r} was not received by {self!r}")
        return receipt

    def _begin_settle(self, receipt: _Receipt, delivery: Delivery) -> bool:
        """Move a held receipt to SETTLING (caller holds _cond). False: already settled."""
        if receipt.state in (_SETTLED, _SETTLING):
            return False
        if receipt.state != _HELD:
            raise InvalidReceipt(
                f"delivery {delivery.envelope.id!r} is no longer held (its lease ran out or "
                "the connection was lost); RabbitMQ delivers it again"
            )
        receipt.state = _SETTLING
        self._held.discard(receipt)
        return True

    def _send_settle(self, receipt: _Receipt, delivery: Delivery, action: str) -> None:
        """Send ack or requeue-reject for a SETTLING receipt (I/O thread)."""

        def io() -> bool:
            channel = self._link.channel("con")
            if channel is None or receipt.epoch != self._link.epoch("con"):
                return False
            if action == "ack":
                channel.basic_ack(receipt.tag)
            else:
                channel.basic_reject(receipt.tag, requeue=action == "requeue")
            return True

        try:
            sent = self._link.run(io, self._deadline())
        except OperationTimeout:
            sent = False
        with self._cond:
            if receipt.state == _SETTLING:
                receipt.state = _SETTLED if sent else _LOST
                if sent:
                    receipt.consumer.outstanding -= 1
        if not sent:
            self._check_open()
            raise InvalidReceipt(
                f"delivery {delivery.envelope.id!r} cannot be settled: the consume channel "
                "closed since it was received, so RabbitMQ delivers it again"
            )

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge: the message is gone for good. Idempotent.

        Raises:
            InvalidReceipt: the lease ran out or the connection was lost since the delivery
                (RabbitMQ delivers the message again); a delivery of another broker.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        link = self._link
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
            # basic.ack has no reply, so waiting for the I/O thread to write the frame adds
            # a thread hand-off (~250 µs here) and no guarantee: a frame written just before
            # the connection drops is lost the same way. When the channel that delivered
            # the message is still the open one, hand the frame over and return; if it
            # closes first, _ack_io drops the ack and RabbitMQ delivers the message again
            # (as after any connection loss). Otherwise settle synchronously, which reports
            # the lost delivery.
            if link.is_open and link.channel_open("con") and receipt.epoch == link.epoch("con"):
                receipt.state = _SETTLED
                receipt.consumer.outstanding -= 1
                handed_over = True
            else:
                handed_over = False
        if handed_over:
            link.call_soon(lambda: self._ack_io(receipt))
            return
        self._send_settle(receipt, delivery, "ack")

    def _ack_io(self, receipt: _Receipt) -> None:
        """I/O thread: write the ack of a receipt ``ack`` handed over."""
        channel = self._link.channel("con")
        if channel is None or receipt.epoch != self._link.epoch("con"):
            log.info(
                "ack of delivery tag %d dropped: its channel closed first (RabbitMQ delivers "
                "the message again)",
                receipt.tag,
            )
            return
        try:
            channel.basic_ack(receipt.tag)
        except Exception as exc:  # closing under us: the same as dropped
            log.info("ack of delivery tag %d dropped: %s", receipt.tag, _said(exc))

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Give a delivery back (``requeue=True``) or dead-letter it. Idempotent.

        Dead-lettering publishes a copy to ``<queue>.dead`` with the ``reason`` and source
        queue in headers, waits for its confirm, then acks; with ``dead_letter="dlx"`` too
        (RabbitMQ's own move could not record the reason; see the module docstring).

        Raises:
            InvalidReceipt: as for :meth:`ack`.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
        if requeue:
            self._send_settle(receipt, delivery, "requeue")
            return
        try:
            self._publish_dead(delivery, clean_reason(reason))
        except BaseException:
            with self._cond:  # not dead-lettered: the delivery is still ours to settle
                if receipt.state == _SETTLING:
                    receipt.state = _HELD
                    self._held.add(receipt)
            raise
        self._send_settle(receipt, delivery, "ack")

    def _publish_dead(self, delivery: Delivery, reason: str) -> None:
        """Publish the dead-letter copy. Only a transient failure raises: a copy RabbitMQ
        cannot take (headers past ``frame_max``, a dead-letter queue name too long) is
        replaced by a stand-in without the original headers, and failing that dropped."""
        envelope = delivery.envelope
        dead = self.dead_letter_queue(delivery.queue)
        headers = dict(envelope.headers)
        headers[DEAD_LETTER_REASON_HEADER] = reason
        headers[DEAD_LETTER_SOURCE_HEADER] = delivery.queue
        try:
            self._publish_copy(dataclasses.replace(envelope, headers=headers), dead)
            return
        except OperationalError:
            raise
        except ConveyorError as exc:
            log.error(
                "dead letter of %s refused (%s): keeping its body only", envelope.id, _said(exc)
            )
        original = clean_text(repr(dict(envelope.headers)), MAX_ORIGINAL_CHARS)
        headers = {
            DEAD_LETTER_REASON_HEADER: reason,
            DEAD_LETTER_SOURCE_HEADER: delivery.queue,
            ORIGINAL_HEADER: original,
        }
        try:
            self._publish_copy(dataclasses.replace(envelope, headers=headers), dead)
        except OperationalError:
            raise
        except ConveyorError as exc:
            log.error("cannot dead-letter %s (%s): it is dropped", envelope.id, _said(exc))

    def _publish_copy(self, envelope: Envelope, queue: str) -> None:
        _check_name(queue.removesuffix(DEAD_LETTER_SUFFIX))
        if len(queue.encode("utf-8")) > _MAX_NAME_BYTES:
            raise ConfigurationError(f"queue name {queue[:40]!r}... is longer than 255 bytes")
        deadline = self._deadline()
        self._ensure_queues([queue], deadline)
        self._link.publish([("", queue, envelope.body, self._properties(envelope))], deadline)

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep holding ``delivery`` for ``seconds`` from now (the client-side lease).

        RabbitMQ itself holds it as long as the consume channel lives, up to the server's
        ``consumer_timeout``; a warning is logged when a delivery gets close to it.

        Raises:
            InvalidReceipt: settled, or the lease was lost (expired, connection lost).
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        if not (isinstance(seconds, (int, float)) and seconds >= 0):
            raise ConfigurationError(f"seconds must be >= 0, got {seconds!r}")
        now = time.monotonic()
        with self._cond:
            if receipt.state != _HELD:
                raise InvalidReceipt(
                    f"delivery {delivery.envelope.id!r} is not held (settled, or its lease "
                    "ran out or the connection was lost)"
                )
            receipt.deadline = now + float(seconds)
            limit = self.options.consumer_timeout
            held_for = now - receipt.received + float(seconds)
            warn = limit is not None and held_for > 0.9 * limit
            warn = warn and id(receipt) not in self._warned_timeout
            if warn:
                self._warned_timeout.add(id(receipt))
        if warn:
            log.warning(
                "delivery %s has been held %.0fs, close to RabbitMQ's consumer_timeout "
                "(%.0fs): the server will close the channel and redeliver it; raise "
                "consumer_timeout in rabbitmq.conf for tasks this long",
                delivery.envelope.id,
                now - receipt.received,
                limit,
            )

    def _expire_leases(self) -> None:
        """I/O thread tick: give back deliveries whose lease ran out."""
        now = time.monotonic()
        with self._cond:
            expired = [r for r in self._held if r.deadline <= now]
            for receipt in expired:
                self._held.discard(receipt)
                receipt.state = _LOST
                receipt.consumer.outstanding -= 1
            paused = []
            for queue in {r.queue for r in expired}:
                consumer = self._consumers.get(queue)
                if consumer is not None and consumer.active:
                    consumer.active = False  # so another consumer gets the message
                    paused.append(consumer.tag)
        if not expired:
            return
        channel = self._link.channel("con")
        epoch = self._link.epoch("con")
        if channel is not None:
            # Cancel first (same channel, so RabbitMQ applies it first): otherwise the
            # requeued message may go straight back to this consumer.
            for tag in paused:
                channel.basic_cancel(tag)
        for receipt in expired:
            log.warning(
                "lease of a delivery from %r ran out after %.1fs without ack or extend: "
                "giving it back to RabbitMQ",
                receipt.queue,
                now - receipt.received,
            )
            if channel is not None and receipt.epoch == epoch:
                channel.basic_reject(receipt.tag, requeue=True)

    # ------------------------------------------------------------------ purge, size
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many.

        Deliveries this broker buffered but did not hand out count as ready and are
        removed too; held deliveries are not touched. Blocks for a few dozen round trips
        (it looks for every delay level).

        Raises:
            ConnectionLost: the broker is closed or RabbitMQ unreachable.
        """
        self._check_open()
        _check_name(queue)
        deadline = self._deadline()
        return self._link.run_op_retrying(lambda: self._op_purge(queue), deadline)

    def _op_purge(self, queue: str) -> Op[int]:
        link = self._link
        with self._cond:
            consumer = self._consumers.get(queue)
            pause = consumer is not None and consumer.active and consumer.credit > 0
            if pause and consumer is not None:
                consumer.active = False
        if pause and consumer is not None:
            # Deliveries in flight to a consumer with credit would escape the purge; after
            # cancel-ok none can arrive (pika returns the in-between ones to the queue).
            yield rpc("con", "basic_cancel", consumer.tag)
        count = 0
        # Downstream order (highest level first, the queue last): a message moving between
        # levels meanwhile is caught further down.
        for level in reversed(range(DELAY_LEVELS)):
            count += yield from self._purge_one(delay_queue_name(queue, level), passive=True)
        count += yield from self._purge_one(queue, passive=False)
        with self._cond:
            buffered = self._buffers.pop(queue, [])
            drop = []
            for _p, _s, delivery in buffered:
                receipt: _Receipt = delivery.receipt
                if receipt.state == _BUFFERED:
                    receipt.state = _SETTLED
                    receipt.consumer.outstanding -= 1
                    drop.append(receipt)
        channel = link.channel("con")
        epoch = link.epoch("con")
        for receipt in drop:
            if channel is not None and receipt.epoch == epoch:
                channel.basic_ack(receipt.tag)
                count += 1
        return count

    def _purge_one(self, name: str, *, passive: bool) -> Op[int]:
        try:
            if passive:
                yield rpc("adm", "queue_declare", name, passive=True)
            frame = yield rpc("adm", "queue_purge", name)
        except QueueNotFound:
            return 0
        return int(frame.method.message_count)

    def size(self, queue: str) -> int:
        """Ready messages of ``queue``: RabbitMQ's count plus this broker's undelivered
        buffer (delayed and held messages are not counted). 0 for a missing queue."""
        self._check_open()
        _check_name(queue)
        deadline = self._deadline()
        total = previous = -1
        for _attempt in range(30):
            ready = self._link.run_op_retrying(lambda: self._op_size(queue), deadline)
            with self._cond:
                buffered = len(self._buffers.get(queue, ()))
                consumer = self._consumers.get(queue)
                credit = consumer.credit if consumer is not None else 0
            total = ready + buffered
            # With credit left, RabbitMQ may be sending us one of `ready` right now (counted
            # by neither side); quorum queues also report a count a few ms stale after a
            # delivery. Answer once two samples agree and nothing can be in flight.
            settled = not (ready and credit > 0)
            if settled and total == previous:
                break
            previous = total if settled else -1
            time.sleep(0.01)
        return total

    def _op_size(self, queue: str) -> Op[int]:
        try:
            frame = yield rpc("adm", "queue_declare", queue, passive=True)
        except QueueNotFound:
            return 0
        return int(frame.method.message_count)

    # ------------------------------------------------------------------ housekeeping
    def known_queues(self) -> set[str]:
        """Queues this broker declared (delay levels and dead-letter queues included)."""
        with self._cond:
            return set(self._known)

    def delete_queue(self, queue: str, *, dead_letters: bool = True) -> None:
        """Delete ``queue``, its exchange, its delay levels and (``dead_letters``) its
        dead-letter queue. For tests and operations; idempotent."""
        self._check_open()
        _check_name(queue)
        names = [queue]
        if dead_letters:
            names.append(self.dead_letter_queue(queue))
        deadline = self._deadline()
        self._link.run_op_retrying(lambda: self._op_delete(names), deadline)
        with self._cond:
            self._declared.difference_update(names)
            self._delay_ready = {(q, lv) for q, lv in self._delay_ready if q not in names}
            self._known.difference_update(names)

    def _op_delete(self, names: Sequence[str]) -> Op[None]:
        # Deleting a missing queue or exchange is not an error in RabbitMQ: pipeline them.
        for name in names:
            for level in range(DELAY_LEVELS):
                yield fire("adm", "queue_delete", delay_queue_name(name, level))
            yield fire("adm", "queue_delete", name)
            yield fire("adm", "exchange_delete", name)
        yield rpc("adm", "exchange_declare", _DELIVER_EXCHANGE, "topic", durable=True)

    def close(self) -> None:
        """Close the connection: RabbitMQ requeues every held and buffered delivery
        (``redelivered``). Idempotent. Later calls raise :class:`ConnectionLost`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._link.close()
        with self._cond:
            for receipt in self._held:
                receipt.state = _LOST
            self._held.clear()
            self._buffers.clear()
            self._consumers.clear()


class AMQPPriorityBroker(AMQPBroker):
    """:class:`AMQPBroker` on queues declared with ``x-max-priority`` (the ``max_priority``
    option): declares ``priority`` (higher first, FIFO within one priority)."""

    capabilities: ClassVar[frozenset[Capability]] = AMQPBroker.capabilities | {Capability.PRIORITY}


def _check_name(name: str) -> None:
    validate_queue_name(name)
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES - len(DEAD_LETTER_SUFFIX):
        raise ConfigurationError(
            f"queue name {name[:40]!r}... is longer than RabbitMQ allows "
            f"({_MAX_NAME_BYTES} bytes, with room for {DEAD_LETTER_SUFFIX!r})"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"queue names starting with 'amq.' are reserved: {name!r}")

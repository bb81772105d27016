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

How it works (``docs/stores/amqp.md`` has the details):

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
  are encoded by :class:`Properties` (as py-amqp does), and importing this package installs a
  fix for pika's decoder of ``f``/``d`` values (only while pika has the bug).

Modules: :mod:`~conveyor.transports.amqp.topology` (declarations, delay and dead-letter
topology), :mod:`~conveyor.transports.amqp.consumers` (consumers, leases, delivery counts),
:mod:`~conveyor.transports.amqp.broker` (the broker); the connection, options, field tables
and error translation are shared with ``rpc://`` in :mod:`conveyor._drivers.amqp`.
"""

from __future__ import annotations

from conveyor._drivers.amqp.errors import translate_error
from conveyor._drivers.amqp.fields import Properties
from conveyor._drivers.amqp.link import AMQPLink
from conveyor._drivers.amqp.options import (
    DEFAULT_MAX_MESSAGE_SIZE,
    AMQPConnectionOptions,
    AMQPEndpoint,
    check_message_size,
    parse_amqp_url,
    redact_url,
)
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
)

from .broker import AMQPBroker, AMQPPriorityBroker
from .consumers import DELIVERIES_HEADER
from .topology import (
    DELAY_EXCHANGE_PREFIX,
    DELAY_LEVELS,
    DELAY_RESOLUTION,
    MAX_DELAY,
    AMQPBrokerOptions,
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
    "Properties",
    "check_message_size",
    "parse_amqp_url",
    "redact_url",
    "translate_error",
]

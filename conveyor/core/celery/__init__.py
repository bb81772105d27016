"""Celery 5.x wire formats: task messages (protocol v2, reading v1) and result metas.

This module turns a :class:`TaskMessage` into the exact :class:`~conveyor.core.types.Envelope`
Celery 5.7 sends (``build_envelope``), reads any Celery 5.x task message back
(``parse_envelope``, ``peek``), and converts :class:`~conveyor.core.types.ResultRecord` to and
from Celery's result meta document (``meta_from_record``, ``record_from_meta``,
``encode_meta``, ``decode_meta``). The wire rules are stated in ``docs/celery-compat.md``
(task messages and result metas); the golden tests in
``tests/unit/test_celery_protocol.py`` compare against real Celery.

Deviations from Celery, on purpose:

* **Naive ``eta``/``expires`` are read as UTC** in protocol v2 (Celery reads them in the
  worker's local timezone). We always *send* timezone-aware values, as Celery does, so this only
  matters for hand-made messages. Protocol v1 honours the message's ``utc`` flag.
* **Malformed bodies raise** :class:`~conveyor.core.errors.DecodeError` instead of crashing
  the consumer: a v2 body must be exactly ``[args(list), kwargs(map), embed(map|null)]``
  (a two-item body kills a real Celery worker; ours dead-letters it).
* An unknown or uninstalled ``compression`` header value is a ``DecodeError`` on the message
  (the message is what is wrong from the consumer's point of view), with the cause chained.
* Stamps travel in ``stamps``/``stamped_headers`` only; Celery 5.7 no longer copies each stamp
  to the top level of the headers, and neither do we. Top-level copies from older senders are
  not reported as extra headers.
* Exceptions are rebuilt only from modules already in ``sys.modules`` and only when the named
  object is an exception class, like Celery; but where Celery fabricates a class, we return
  :class:`~conveyor.core.errors.TaskError`, which carries the remote type name and arguments.

Modules: :mod:`~conveyor.core.celery.messages` (task messages),
:mod:`~conveyor.core.celery.results` (result metas, exception documents, group layouts, the
compressed-result marker), :mod:`~conveyor.core.celery.saferepr` (``argsrepr``/``kwargsrepr``).
Import the names from this package.

Thread-safety: everything here is a pure function of its arguments (plus the registry passed
in); safe from any thread.
"""

from __future__ import annotations

from conveyor.core.celery.messages import (
    MAX_TIME_LIMIT,
    Signature,
    TaskMessage,
    TaskPeek,
    build_envelope,
    default_origin,
    parse_envelope,
    peek,
)
from conveyor.core.celery.results import (
    COMPRESSED_RESULT_MARKER,
    celery_key_prefix,
    decode_meta,
    decode_payload,
    encode_meta,
    exception_from_meta,
    exception_to_meta,
    group_from_meta,
    group_meta,
    meta_from_record,
    record_from_meta,
    result_tuple,
)
from conveyor.core.celery.saferepr import REPR_MAXLEN, REPR_MAXLEVELS, saferepr

__all__ = [
    "COMPRESSED_RESULT_MARKER",
    "MAX_TIME_LIMIT",
    "REPR_MAXLEN",
    "REPR_MAXLEVELS",
    "Signature",
    "TaskMessage",
    "TaskPeek",
    "build_envelope",
    "celery_key_prefix",
    "decode_meta",
    "decode_payload",
    "default_origin",
    "encode_meta",
    "exception_from_meta",
    "exception_to_meta",
    "group_from_meta",
    "group_meta",
    "meta_from_record",
    "parse_envelope",
    "peek",
    "record_from_meta",
    "result_tuple",
    "saferepr",
]

"""Message signing: HMAC-SHA256 over a task message's body and the headers that matter.

Optional, off by default. Turn it on with the ``security_key`` setting (a key, or a list of
keys for rotation)::

    app = App("tasks", broker=..., security_key=os.environ["CONVEYOR_SIGNING_KEY"])
    # rotation: the first key signs, every key verifies
    app.conf.security_key = [new_key, old_key]

The app then signs every task message it sends (``x-conveyor-signature`` header), and its
workers verify every delivery *before decoding its body*: a message without a signature, or
with one that no configured key produced, is refused: logged and dead-lettered (header
``x-conveyor-dead-letter-reason`` where the broker keeps dead letters), and it writes *no*
result under the task id it claims, since that id may not be its sender's to write (a
forged message must not overwrite, or pre-empt, a legitimate task's result). Verification
compares in constant time (:func:`hmac.compare_digest`).

What is signed (version 1), as one byte string::

    b"conveyor-signature-v1\\n"
    + canonical JSON of the signed fields
    + b"\\n"
    + body (the bytes on the wire: serialized, compressed)

where the signed fields are ``{"content_type", "content_encoding", "correlation_id",
"reply_to", "headers"}`` and ``headers`` is every header except the signature itself and
names starting with ``x-`` (those belong to transports and brokers: ``x-delivery-count``,
``x-death``, dead-letter reasons; they change in flight). Canonical JSON is
``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)``, with tuples
as lists, ``bytes`` as ``{"$bytes": "<hex>"}`` and datetimes as ISO-8601 text, so a header
map that went through any broker and came back with lists for tuples signs the same.
Not signed: the envelope ``id`` and ``priority`` (brokers may map priorities to their own
steps), and the delay (a broker holds a message; the ``eta`` header is signed).

The header's value is ``"v1:" + hex digest``. Results are not signed: protect the result
store with its own credentials.

Replay is a known limit, by design. A signature proves which key made a message, not that
the message is new: whoever can read a signed message (off the broker, or off the network
without TLS) and publish to the broker can publish the same bytes again, and workers will
verify and run it again, with the same task, arguments and task id. A second copy of an id
cannot be refused, because at-least-once delivery makes legitimate ones (a redelivery after
a lost ack, a publish retried after a timeout), and remembering every id seen would need a
store kept as long as a message may wait (an ``eta`` months ahead). A built-in signed expiry
would revoke legitimate messages that waited in a backlog longer than it. What the signature
does bound: a replay cannot change the task, its arguments, its id, ``eta``, ``expires``,
``retries`` or any other signed header, and its result lands under the same id. To narrow
replay further:

* make tasks idempotent (at-least-once delivery needs that anyway);
* give sensitive tasks ``expires`` (signed): an expired message is revoked, never run, so a
  captured message is worthless after that time;
* keep the broker private: TLS (``rediss://``, ``amqps://``, TLS options for MongoDB and
  SQL) so messages cannot be read in flight, and broker credentials or ACLs so that only
  producers can publish.

Not signed, so changeable by anyone who can publish: the queue a message is published to (a
signed message can be made to run on another queue whose workers know the task), its
priority, the envelope id, and ``x-`` headers (the brokers' own: a forged delivery count can
get a message dead-lettered early). Rotating keys does not void captured messages signed by a
key that is still in the list.

Thread-safety: :class:`Signer` is immutable; share it freely.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date, datetime
from typing import Any

from conveyor.core.errors import ConfigurationError, SerializationError
from conveyor.core.types import Envelope

__all__ = [
    "SIGNATURE_HEADER",
    "InvalidSignature",
    "Signer",
    "canonical_bytes",
    "signer_from_config",
]

#: The header carrying ``"v1:" + hex(HMAC-SHA256)``.
SIGNATURE_HEADER = "x-conveyor-signature"
_PREFIX = b"conveyor-signature-v1\n"
_VERSION = "v1:"
#: Keys shorter than this are refused: HMAC-SHA256 wants 32 random bytes; 16 is the floor.
MIN_KEY_BYTES = 16


class InvalidSignature(SerializationError):
    """A message is unsigned, or its signature was not made by any configured key."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"header value of type {type(value).__name__} cannot be signed")


def signed_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers covered by the signature: all but ``x-*`` and the signature."""
    return {
        str(k): v
        for k, v in headers.items()
        if not str(k).lower().startswith("x-") and k != SIGNATURE_HEADER
    }


def canonical_bytes(envelope: Envelope) -> bytes:
    """The exact bytes the HMAC covers (see the module docstring)."""
    fields = {
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
        "headers": signed_headers(envelope.headers),
    }
    try:
        text = json.dumps(
            fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise InvalidSignature(f"message headers cannot be put in canonical form: {exc}") from exc
    return _PREFIX + text.encode("ascii") + b"\n" + bytes(envelope.body)


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        raw = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray)):
        raw = bytes(key)
    else:
        raise ConfigurationError(
            f"security_key must be a str, bytes or a list of them, not {type(key).__name__}"
        )
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"security_key is too short ({len(raw)} bytes): use at least {MIN_KEY_BYTES} "
            "(32 random bytes recommended, e.g. secrets.token_hex(32))"
        )
    return raw


class Signer:
    """Signs envelopes with the first key and verifies them against every key.

    Args:
        keys: one key or several (``str`` is UTF-8 encoded). The first signs.

    Raises:
        ConfigurationError: no key, or a key shorter than 16 bytes, or not str/bytes.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: str | bytes | Sequence[str | bytes]) -> None:
        if isinstance(keys, (str, bytes, bytearray)):
            keys = [keys]
        found = tuple(_key_bytes(k) for k in keys)
        if not found:
            raise ConfigurationError("security_key is an empty list: give at least one key")
        self._keys = found

    def __repr__(self) -> str:
        return f"<Signer: {len(self._keys)} key(s), hmac-sha256>"  # never the keys

    @staticmethod
    def _digest(key: bytes, envelope: Envelope) -> str:
        return hmac.new(key, canonical_bytes(envelope), hashlib.sha256).hexdigest()

    def signature(self, envelope: Envelope) -> str:
        """The header value for ``envelope`` under the signing (first) key."""
        return _VERSION + self._digest(self._keys[0], envelope)

    def sign(self, envelope: Envelope) -> Envelope:
        """A copy of ``envelope`` with the signature header set (replacing any old one)."""
        headers = {k: v for k, v in envelope.headers.items() if k != SIGNATURE_HEADER}
        headers[SIGNATURE_HEADER] = self.signature(envelope)
        return replace(envelope, headers=headers)

    def verify(self, envelope: Envelope) -> None:
        """Return if a configured key signed ``envelope``.

        Raises:
            InvalidSignature: unsigned, unknown version, malformed, or no key matches.
        """
        given = envelope.headers.get(SIGNATURE_HEADER)
        if given is None:
            raise InvalidSignature(f"unsigned message: no {SIGNATURE_HEADER} header")
        if isinstance(given, (bytes, bytearray)):
            given = bytes(given).decode("ascii", "replace")
        if not isinstance(given, str) or not given.startswith(_VERSION):
            raise InvalidSignature(
                f"unsupported signature format in {SIGNATURE_HEADER} (expected 'v1:<hex>')"
            )
        digest = given[len(_VERSION) :].encode("ascii", "replace")
        matched = False
        for key in self._keys:  # every key, no early exit: timing says nothing about which
            expected = self._digest(key, envelope).encode("ascii")
            matched |= hmac.compare_digest(expected, digest)
        if not matched:
            raise InvalidSignature("bad signature: no configured security_key signed this message")


@functools.lru_cache(maxsize=8)
def _cached_signer(keys: tuple[str | bytes, ...]) -> Signer:
    return Signer(keys)


def signer_from_config(value: Any) -> Signer | None:
    """The :class:`Signer` for a ``security_key`` setting, or None when signing is off
    (``None``). Cached per key set, so calling it on every send is cheap.

    Raises:
        ConfigurationError: an empty string, a short key, or a value of the wrong type.
    """
    if value is None:
        return None
    if isinstance(value, Signer):
        return value
    if isinstance(value, (str, bytes, bytearray)):
        keys: tuple[str | bytes, ...] = (bytes(value) if isinstance(value, bytearray) else value,)
    elif isinstance(value, Sequence):
        keys = tuple(value)
        for key in keys:
            if not isinstance(key, (str, bytes)):
                raise ConfigurationError(
                    "security_key must be a str, bytes or a list of them, not a list holding "
                    f"{type(key).__name__}"
                )
    else:
        raise ConfigurationError(
            f"security_key must be a str, bytes or a list of them, not {type(value).__name__}"
        )
    if keys == ("",) or keys == (b"",):
        raise ConfigurationError(
            "security_key is empty: set a key of at least 16 bytes, or None to turn signing off"
        )
    return _cached_signer(keys)

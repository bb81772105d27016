"""Private helpers every built-in broker shares: dead-letter headers, reason text, delay limits.

Not a public API. The public names (``DEAD_LETTER_REASON_HEADER`` ...) are re-exported by each
broker module, as before.

Dead letters, the same on every broker that declares ``dead_letter``:

* ``reject(delivery, requeue=False, reason=...)`` moves the message to
  ``dead_letter_queue(q) == q + ".dead"``; receiving from that queue gives it back with the
  reason in the header :data:`DEAD_LETTER_REASON_HEADER` and the source queue in
  :data:`DEAD_LETTER_SOURCE_HEADER` (``delivery.envelope.headers[...]``, whatever the store
  keeps it in). The reason is made safe by :func:`clean_reason` first: any object, any size,
  any characters, and the result is at most :data:`MAX_REASON_CHARS` characters of printable
  text, so recording it can never fail.
* A message a broker cannot turn into a :class:`~conveyor.core.types.Delivery` (an envelope
  that is not JSON, a row whose headers are not a map, a document with a dict for its id, AMQP
  properties of the wrong types, ...) is never handed out, never raised from ``receive`` and
  never left to come back: the broker dead-letters it at once as a well-formed message of
  content type :data:`UNDECODABLE_CONTENT_TYPE` (so no worker runs it), with the reason
  ``"undecodable message: ..."``, the original body (for Redis, where the whole message is one
  text, the original text) and what was wrong with the rest in :data:`ORIGINAL_HEADER`; then
  ``receive`` returns the other messages of the batch. Where the store cannot take the dead
  letter, the message is dropped with an error log instead: it must not loop.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from conveyor.core.base import DEAD_LETTER_SUFFIX
from conveyor.core.errors import ConfigurationError, DecodeError

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "EXACT_MS_MAX_DELAY",
    "MAX_REASON_CHARS",
    "ORIGINAL_HEADER",
    "UNDECODABLE_CONTENT_TYPE",
    "check_delay",
    "clamp_priority",
    "clean_reason",
    "clean_text",
    "undecodable_reason",
]

#: Header of a dead letter: the ``reason`` given to ``reject`` (after :func:`clean_reason`).
DEAD_LETTER_REASON_HEADER = "x-conveyor-dead-letter-reason"
#: Header of a dead letter: the queue it was rejected from.
DEAD_LETTER_SOURCE_HEADER = "x-conveyor-dead-letter-queue"
#: Content type of the dead letter that stands for an undecodable message.
UNDECODABLE_CONTENT_TYPE = "application/x-conveyor-undecodable"
#: Header of such a dead letter: the original metadata as text (bounded), where it is not the
#: body already.
ORIGINAL_HEADER = "x-conveyor-original"
#: The longest reason recorded, in characters (about 4 KB in UTF-8 at most).
MAX_REASON_CHARS = 1000
#: The longest :data:`ORIGINAL_HEADER` text, in characters.
MAX_ORIGINAL_CHARS = 16_000
#: The longest delay a store whose due times are float milliseconds (or seconds) keeps to the
#: millisecond: 2**52 ms, about 142,000 years (a double holds every integer below 2**53, and
#: "now" stays below 2**52 ms until the year 144,000).
EXACT_MS_MAX_DELAY = 2.0**52 / 1000.0

log = logging.getLogger("conveyor.transports")

# C0 and C1 control characters and lone surrogates (which UTF-8 cannot encode): a reason
# lands in AMQP headers, SQL text columns (PostgreSQL refuses NUL), BSON and JSON.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACES = re.compile("[\t\n\r]+")


def clean_text(value: Any, limit: int) -> str:
    """``value`` as printable text of at most ``limit`` characters. Never raises.

    Tabs and line breaks become one space; other control characters and lone surrogates
    become U+FFFD; longer text is cut and ends with ``"..."``. The input is cut before it is
    scanned, so a huge value costs no more than a small one.
    """
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a __str__ that raises: say what it was instead
        text = f"<unprintable {type(value).__name__}>"
    cut = len(text) > limit
    if cut:
        text = text[: max(0, limit - 3)]
    text = _UNSAFE.sub("\ufffd", _SPACES.sub(" ", text))
    return text + "..." if cut else text


def clean_reason(reason: Any) -> str:
    """The dead-letter reason as it is recorded: :func:`clean_text` to
    :data:`MAX_REASON_CHARS`."""
    return clean_text(reason, MAX_REASON_CHARS)


def undecodable_reason(error: BaseException) -> str:
    """The dead-letter reason of a message that could not be decoded."""
    kind = "" if isinstance(error, DecodeError) else f"{type(error).__name__}: "
    detail = clean_text(error, MAX_REASON_CHARS - 40) or type(error).__name__
    return clean_reason(f"undecodable message: {kind}{detail}")


def check_delay(delay: float | None, limit: float, owner: str, why: str) -> None:
    """Refuse a delay the store cannot hold, at publish and with a non-transient error.

    Raises:
        ConfigurationError: ``delay`` is infinite or longer than ``limit`` seconds; the
            message names the limit and ``why`` it exists (retrying cannot help).
    """
    if delay is None or not delay > 0:
        return  # negative and NaN delays are refused by BrokerBase._check_publish
    if not math.isfinite(delay) or delay > limit:
        raise ConfigurationError(
            f"delay {delay!r}s is longer than {owner} can hold: at most {limit:.6g}s "
            f"(about {limit / 31_557_600:,.0f} years; {why})"
        )


def clamp_priority(value: Any) -> int:
    """A stored priority as conveyor's 0-9 (out-of-range numbers are clamped).

    Raises:
        ValueError: not an integer (a bool is not one either).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be an integer, got {type(value).__name__}")
    return 0 if value < 0 else 9 if value > 9 else int(value)

"""Replay of a signed message: the documented limit, held to what the docstring promises
(issue 13, item 6). A byte-for-byte replay verifies (at-least-once delivery cannot tell it
from a redelivery); any change to what is signed, including ``expires`` and ``eta``, does
not; the unsigned parts are exactly the ones the docstring lists.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from conveyor.core import signing
from conveyor.core.celery import TaskMessage, build_envelope, parse_envelope
from conveyor.core.signing import SIGNATURE_HEADER, InvalidSignature, Signer
from conveyor.core.types import Envelope

KEY = "replay-test-key-0123456789abcdef"


def _signed() -> tuple[Signer, Envelope]:
    signer = Signer(KEY)
    soon = datetime.now(timezone.utc) + timedelta(minutes=5)
    msg = TaskMessage(task="pay", id="id-1", args=(10,), expires=soon)
    return signer, signer.sign(build_envelope(msg))


def test_the_signing_docstring_documents_replay_and_its_mitigations() -> None:
    doc = " ".join((signing.__doc__ or "").split())
    assert "Replay is a known limit" in doc
    for mitigation in ("idempotent", "expires", "TLS", "ACLs"):
        assert mitigation in doc


def test_a_byte_for_byte_replay_verifies_like_a_redelivery() -> None:
    signer, env = _signed()
    copy = replace(env)  # what a captured and re-published message is
    signer.verify(copy)
    assert parse_envelope(copy).id == "id-1"


@pytest.mark.parametrize(
    "header", ["expires", "eta", "id", "task", "retries", "timelimit", "argsrepr"]
)
def test_a_replay_cannot_change_a_signed_header(header: str) -> None:
    signer, env = _signed()
    forged = {**env.headers, header: "2099-01-01T00:00:00+00:00"}
    with pytest.raises(InvalidSignature):
        signer.verify(replace(env, headers=forged))


def test_a_replay_cannot_change_the_arguments() -> None:
    signer, env = _signed()
    with pytest.raises(InvalidSignature):
        signer.verify(replace(env, body=env.body.replace(b"10", b"99")))


def test_the_unsigned_parts_are_the_ones_the_docstring_lists() -> None:
    """Priority, envelope id and ``x-`` headers may change in flight; the queue is not part
    of the message at all. A change there still verifies."""
    signer, env = _signed()
    moved = replace(env, id="other", priority=9, headers={**env.headers, "x-delivery-count": 4})
    signer.verify(moved)
    assert SIGNATURE_HEADER in moved.headers

"""Message signing (conveyor.core.signing): HMAC-SHA256 over body and the headers that
matter, canonical form, key rotation, refusals."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.core.errors import ConfigurationError, SerializationError
from conveyor.core.signing import (
    SIGNATURE_HEADER,
    InvalidSignature,
    Signer,
    canonical_bytes,
    signer_from_config,
)
from conveyor.core.types import Envelope

KEY = "k" * 32
OLD = "o" * 32


def _envelope(**changes: object) -> Envelope:
    env = Envelope(
        id="2f1f5d8e-0000-4000-8000-000000000001",
        body=b'[[2, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        headers={
            "lang": "py",
            "task": "tasks.add",
            "id": "2f1f5d8e-0000-4000-8000-000000000001",
            "eta": None,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": "(2, 2)",
        },
        correlation_id="2f1f5d8e-0000-4000-8000-000000000001",
        reply_to="7c0e-reply",
    )
    return replace(env, **changes)  # type: ignore[arg-type]


def test_a_signed_envelope_verifies_and_carries_a_v1_hex_signature() -> None:
    signer = Signer(KEY)
    signed = signer.sign(_envelope())
    value = signed.headers[SIGNATURE_HEADER]
    assert value.startswith("v1:")
    assert len(value) == 3 + 64
    int(value[3:], 16)  # hex
    signer.verify(signed)


def test_the_canonical_form_is_pinned_by_a_golden_vector() -> None:
    """The documented encoding, computed by hand: changing it breaks every deployed signer."""
    env = Envelope(
        id="i", body=b"[[1], {}, {}]", headers={"task": "t", "id": "i", "timelimit": (None, 5)}
    )
    expected = (
        b"conveyor-signature-v1\n"
        b'{"content_encoding":"utf-8","content_type":"application/json",'
        b'"correlation_id":null,"headers":{"id":"i","task":"t","timelimit":[null,5]},'
        b'"reply_to":null}\n'
        b"[[1], {}, {}]"
    )
    assert canonical_bytes(env) == expected
    digest = hmac.new(KEY.encode(), expected, hashlib.sha256).hexdigest()
    assert Signer(KEY).signature(env) == f"v1:{digest}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: replace(e, body=e.body.replace(b"2, 2", b"2, 3")),
        lambda e: replace(e, headers={**e.headers, "task": "tasks.rm_rf"}),
        lambda e: replace(e, headers={**e.headers, "eta": "2030-01-01T00:00:00+00:00"}),
        lambda e: replace(e, headers={k: v for k, v in e.headers.items() if k != "retries"}),
        lambda e: replace(e, headers={**e.headers, "extra": 1}),
        lambda e: replace(e, content_type="application/x-python-serialize"),
        lambda e: replace(e, content_encoding="binary"),
        lambda e: replace(e, reply_to="attacker-queue"),
        lambda e: replace(e, correlation_id="someone-else"),
    ],
    ids=[
        "body",
        "task-name",
        "eta",
        "removed-header",
        "added-header",
        "content-type",
        "content-encoding",
        "reply-to",
        "correlation-id",
    ],
)
def test_any_change_to_what_matters_breaks_the_signature(tamper: object) -> None:
    signer = Signer(KEY)
    signed = signer.sign(_envelope())
    assert callable(tamper)
    with pytest.raises(InvalidSignature, match="bad signature"):
        signer.verify(tamper(signed))


def test_transport_headers_priority_and_id_may_change_in_flight() -> None:
    """Brokers add x-* headers (x-delivery-count, x-death, dead-letter reasons), may map
    priorities to their own steps, and turn tuples into lists: none of that breaks it."""
    signer = Signer(KEY)
    signed = signer.sign(_envelope(headers={**_envelope().headers, "timelimit": (None, None)}))
    moved = replace(
        signed,
        id="other-id",
        priority=6,
        headers={**signed.headers, "x-delivery-count": 3, "x-death": [{"count": 1}],
                 "timelimit": [None, None]},
    )  # fmt: skip
    signer.verify(moved)


def test_unsigned_and_malformed_signatures_are_refused() -> None:
    signer = Signer(KEY)
    env = _envelope()
    with pytest.raises(InvalidSignature, match="unsigned"):
        signer.verify(env)
    for bad in ("", "v2:" + "0" * 64, "v1:", "v1:zz", "0" * 64, 12345, None):
        headers = {**env.headers, SIGNATURE_HEADER: bad}
        with pytest.raises(InvalidSignature):
            signer.verify(replace(env, headers=headers))
    # bytes from a driver that hands header values back undecoded still verify
    signed = signer.sign(env)
    raw = {**signed.headers, SIGNATURE_HEADER: signed.headers[SIGNATURE_HEADER].encode()}
    signer.verify(replace(signed, headers=raw))


def test_invalid_signature_is_a_serialization_error_so_the_worker_dead_letters_it() -> None:
    assert issubclass(InvalidSignature, SerializationError)


def test_a_message_signed_with_another_key_is_refused() -> None:
    signed = Signer(OLD).sign(_envelope())
    with pytest.raises(InvalidSignature):
        Signer(KEY).verify(signed)


def test_key_rotation_first_key_signs_every_key_verifies() -> None:
    rotating = Signer([KEY, OLD])
    from_old_producer = Signer(OLD).sign(_envelope())
    rotating.verify(from_old_producer)
    fresh = rotating.sign(_envelope())
    Signer(KEY).verify(fresh)  # signed with the first key
    with pytest.raises(InvalidSignature):
        Signer(OLD).verify(fresh)


def test_signing_twice_replaces_the_old_signature() -> None:
    once = Signer(OLD).sign(_envelope())
    twice = Signer(KEY).sign(once)
    Signer(KEY).verify(twice)
    assert list(twice.headers).count(SIGNATURE_HEADER) == 1


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("", "empty"),
        ("short", "too short"),
        ([], "empty list"),
        (12345, "str, bytes or a list"),
        ([KEY, 5], "str, bytes or a list"),
        ([[KEY]], "str, bytes or a list"),
    ],
)
def test_bad_keys_are_configuration_errors(value: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        signer_from_config(value)


def test_config_none_means_off_and_a_key_or_list_gives_a_cached_signer() -> None:
    assert signer_from_config(None) is None
    assert signer_from_config(KEY) is signer_from_config(KEY)
    assert signer_from_config([KEY, OLD]) is signer_from_config((KEY, OLD))
    assert signer_from_config(KEY.encode()) is not None
    signer = Signer(KEY)
    assert signer_from_config(signer) is signer


def test_repr_never_shows_a_key() -> None:
    text = repr(Signer([KEY, OLD]))
    assert KEY not in text
    assert OLD not in text
    assert "2 key(s)" in text


@given(body=st.binary(max_size=256), flip=st.integers(min_value=0, max_value=2047))
def test_flipping_any_bit_of_the_body_is_detected(body: bytes, flip: int) -> None:
    signer = Signer(KEY)
    signed = signer.sign(_envelope(body=body + b"\x00"))
    data = bytearray(signed.body)
    index = flip % (len(data) * 8)
    data[index // 8] ^= 1 << (index % 8)
    with pytest.raises(InvalidSignature):
        signer.verify(replace(signed, body=bytes(data)))


@given(
    headers=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: not k.lower().startswith("x-")),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    )
)
def test_any_json_header_map_round_trips(headers: dict[str, object]) -> None:
    signer = Signer(KEY)
    signed = signer.sign(_envelope(headers=headers))
    signer.verify(signed)
    # a copy rebuilt in another key order (as a broker might) verifies too
    signer.verify(replace(signed, headers=dict(reversed(list(signed.headers.items())))))

"""Serializer registry: kombu byte-compatibility, accept lists, typed errors."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import serialization as kombu_serialization

from conveyor.core.errors import (
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    EncodeError,
    MissingDependency,
    SerializationError,
)
from conveyor.core.serializers import (
    DEFAULT_ACCEPT,
    Serializer,
    SerializerRegistry,
    decode,
    default_serializers,
    encode,
    normalize_accept,
)

JSON = "application/json"
MSGPACK = "application/x-msgpack"
YAML = "application/x-yaml"
PICKLE = "application/x-python-serialize"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)

RICH_VALUES: list[Any] = [
    dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
    dt.date(2024, 1, 2),
    dt.time(3, 4, 5),
    Decimal("3.14159"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"plain utf-8 bytes",
    b"\xff\xfe\x00binary",
    "unicode ✓ naïve 漢字 \U0001f600",
    {"nested": [1, 2.5, None, True, {"deep": "x"}]},
]


def kombu_bytes(value: Any) -> bytes:
    _, _, payload = kombu_serialization.dumps(value, serializer="json")
    return payload.encode("utf-8") if isinstance(payload, str) else payload


# ------------------------------------------------------------------------------------- json


@pytest.mark.parametrize("value", RICH_VALUES, ids=lambda v: type(v).__name__)
def test_json_bytes_are_identical_to_kombus(value: Any) -> None:
    body, content_type, content_encoding = encode(value)
    assert body == kombu_bytes(value)
    assert (content_type, content_encoding) == (JSON, "utf-8")


@pytest.mark.parametrize("value", RICH_VALUES, ids=lambda v: type(v).__name__)
def test_json_round_trips_kombus_typed_wrappers(value: Any) -> None:
    assert decode(kombu_bytes(value), JSON, "utf-8") == value


def test_datetime_is_wrapped_the_way_kombu_5_3_writes_it() -> None:
    body, _, _ = encode({"at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)})
    assert body == (b'{"at": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}}')


def test_pre_5_3_plain_string_forms_stay_strings() -> None:
    old = b'{"at": "2024-01-02T03:04:05+00:00", "d": "3.14", "u": "12345678123456781234"}'
    assert decode(old, JSON, "utf-8") == {
        "at": "2024-01-02T03:04:05+00:00",
        "d": "3.14",
        "u": "12345678123456781234",
    }


def test_kombu_decodes_what_we_encode() -> None:
    value = {"when": RICH_VALUES[0], "blob": b"\x00\xff", "n": Decimal("1.5")}
    body, content_type, content_encoding = encode(value)
    assert kombu_serialization.loads(body, content_type, content_encoding, accept=[JSON]) == value


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\xfd",
        b"",
        b'{"__type__": "nope", "__value__": 1}',
        b'{"__type__": "datetime", "__value__": "yesterday"}',
        b'{"__type__": "uuid", "__value__": {"bad": 1}}',
        b"[" * 100_000,
    ],
    ids=["syntax", "not-utf8", "empty", "unknown-type", "bad-datetime", "bad-uuid", "deep"],
)
def test_malformed_json_raises_decode_error_chaining_the_cause(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body, JSON, "utf-8")
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan") * 1j])
def test_unencodable_value_raises_encode_error(value: Any) -> None:
    with pytest.raises(EncodeError) as info:
        encode(value)
    assert info.value.__cause__ is not None


def test_circular_value_raises_encode_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError):
        encode(loop)


def test_text_and_buffer_bodies_decode_like_bytes() -> None:
    assert decode('{"a": 1}', JSON) == {"a": 1}
    assert decode(bytearray(b'{"a": 1}'), JSON) == {"a": 1}
    assert decode(memoryview(b'{"a": 1}'), JSON) == {"a": 1}


def test_content_type_parameters_and_case_are_tolerated() -> None:
    assert decode(b"[1]", "Application/JSON; charset=utf-8", "utf-8") == [1]


# ------------------------------------------------------------------------------ accept lists


def test_default_accept_is_json_only() -> None:
    assert DEFAULT_ACCEPT == ("json",)
    assert normalize_accept(None) == frozenset({JSON})


@pytest.mark.parametrize(
    "accept", [["json"], [JSON], ("json", JSON), frozenset({JSON}), "json", JSON]
)
def test_accept_takes_names_and_content_types(accept: Any) -> None:
    assert decode(b"[1]", JSON, "utf-8", accept=accept) == [1]
    assert decode(b"[1]", JSON, "utf-8", accept=normalize_accept(accept)) == [1]


def test_disallowed_content_is_refused_before_the_bytes_are_read() -> None:
    # Malformed bytes, yet ContentDisallowed: the accept check comes first.
    with pytest.raises(ContentDisallowed) as info:
        decode(b"\x00 not msgpack", MSGPACK, "binary")
    assert info.value.content_type == MSGPACK
    assert info.value.accepted == ["json"]


def test_pickle_is_registered_but_never_accepted_unless_named() -> None:
    body, content_type, content_encoding = encode({"x": 1}, "pickle")
    assert (content_type, content_encoding) == (PICKLE, "binary")
    with pytest.raises(ContentDisallowed):
        decode(body, content_type, content_encoding)
    with pytest.raises(ContentDisallowed):
        decode(body, content_type, content_encoding, accept=["json", "msgpack", "yaml"])
    assert decode(body, content_type, content_encoding, accept=["pickle"]) == {"x": 1}
    assert decode(body, content_type, content_encoding, accept=[PICKLE]) == {"x": 1}


def test_a_string_accept_is_not_a_substring_test() -> None:
    body, content_type, _ = encode([1], "pickle")
    with pytest.raises(ContentDisallowed):
        decode(body, content_type, accept="application/x-python-serialize-not")


@pytest.mark.parametrize("content_type", ["text/plain", "application/data", ""])
def test_unregistered_content_type_is_content_disallowed_even_if_listed(
    content_type: str,
) -> None:
    with pytest.raises(ContentDisallowed):
        decode(b"hello", content_type, "utf-8", accept=[content_type, "json"])


def test_normalize_accept_maps_names_to_content_types() -> None:
    assert normalize_accept(["json", "msgpack", YAML]) == frozenset({JSON, MSGPACK, YAML})


def test_normalize_accept_rejects_unknown_names_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"'jsn'.*Did you mean 'json'"):
        normalize_accept(["jsn"])


# -------------------------------------------------------------------------------- registry


def _upper_serializer(name: str = "upper", content_type: str = "text/x-upper") -> Serializer:
    return Serializer(
        name,
        content_type,
        "utf-8",
        lambda obj: str(obj).upper().encode(),
        lambda data: data.decode().lower(),
    )


def test_registry_is_injectable_and_independent_of_the_default() -> None:
    registry = default_serializers.copy()
    registry.register(_upper_serializer())
    assert registry.encode("abc", "upper") == (b"ABC", "text/x-upper", "utf-8")
    assert registry.decode(b"ABC", "text/x-upper", accept=["upper"]) == "abc"
    with pytest.raises(ConfigurationError):
        default_serializers.get("upper")


def test_registering_over_a_taken_name_or_type_needs_replace() -> None:
    registry = SerializerRegistry()
    with pytest.raises(ConfigurationError, match="replace=True"):
        registry.register(_upper_serializer("json", "text/x-upper"))
    with pytest.raises(ConfigurationError, match="replace=True"):
        registry.register(_upper_serializer("other", JSON))
    registry.register(_upper_serializer("json", "text/x-upper"), replace=True)
    assert registry.get("json").content_type == "text/x-upper"
    with pytest.raises(ConfigurationError):
        registry.get(JSON)  # the old content type went with the replaced serializer


def test_empty_registry_knows_nothing() -> None:
    registry = SerializerRegistry([])
    assert dict(registry.names) == {}
    with pytest.raises(ContentDisallowed):
        registry.decode(b"[1]", JSON, accept=[JSON])


def test_unknown_serializer_on_encode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Known serializers: json, msgpack"):
        encode(1, "msgpak")


def test_codec_exceptions_are_wrapped() -> None:
    def boom(_: Any) -> Any:
        raise RuntimeError("codec bug")

    registry = SerializerRegistry([Serializer("b", "x/b", "binary", boom, boom)])
    with pytest.raises(EncodeError, match="codec bug"):
        registry.encode(1, "b")
    with pytest.raises(DecodeError, match="codec bug"):
        registry.decode(b"1", "x/b", accept=["b"])


# ---------------------------------------------------------------------------- msgpack / yaml


def test_msgpack_round_trip_keeps_bytes_and_text_apart() -> None:
    pytest.importorskip("msgpack")
    value = {"text": "é", "raw": b"\x00\xff", "n": [1, 2.5, None]}
    body, content_type, content_encoding = encode(value, "msgpack")
    assert (content_type, content_encoding) == (MSGPACK, "binary")
    assert decode(body, MSGPACK, "binary", accept=["msgpack"]) == value
    assert body == kombu_serialization.dumps(value, serializer="msgpack")[2]


def test_malformed_msgpack_is_a_decode_error() -> None:
    pytest.importorskip("msgpack")
    with pytest.raises(DecodeError):
        decode(b"\xc1", MSGPACK, "binary", accept=["msgpack"])


def test_yaml_round_trip_uses_safe_dump_and_safe_load() -> None:
    pytest.importorskip("yaml")
    value = {"a": [1, 2], "b": "ü"}
    body, content_type, content_encoding = encode(value, "yaml")
    assert (content_type, content_encoding) == (YAML, "utf-8")
    assert decode(body, YAML, accept=["yaml"]) == value
    with pytest.raises(DecodeError):  # safe_load refuses python tags
        decode(b"!!python/object/apply:os.system ['true']", YAML, accept=["yaml"])


@pytest.mark.parametrize(
    ("name", "module", "extra"), [("msgpack", "msgpack", "msgpack"), ("yaml", "yaml", "yaml")]
)
def test_missing_optional_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependency) as info:
        encode([1], name)
    assert info.value.extra == extra
    assert f"conveyor[{extra}]" in str(info.value)
    with pytest.raises(MissingDependency):
        decode(b"x", default_serializers.get(name).content_type, accept=[name])


# ------------------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_round_trip_of_random_values(value: Any) -> None:
    body, content_type, content_encoding = encode(value)
    assert body == kombu_bytes(value)
    assert decode(body, content_type, content_encoding) == value


# Accept only the codecs installed here (the "unit" env has no extras), so a missing package
# never stands in for a decoding failure.
INSTALLED_ACCEPT = ["json"] + [
    name
    for name, module in (("msgpack", "msgpack"), ("yaml", "yaml"))
    if importlib.util.find_spec(module) is not None
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([JSON, MSGPACK, YAML, PICKLE, "x/unknown"]))
def test_random_bytes_only_raise_serialization_errors(body: bytes, content_type: str) -> None:
    with contextlib.suppress(SerializationError):
        decode(body, content_type, accept=INSTALLED_ACCEPT)

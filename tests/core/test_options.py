"""Option objects built from URL queries and keywords (conveyor.core.options)."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, dataclass

import pytest

from conveyor.core.errors import ConfigurationError
from conveyor.core.options import build_options, closest, parse_bool, parse_seconds
from conveyor.core.urls import parse_url


@dataclass(frozen=True)
class BrokerOptions:
    visibility_timeout: float = 60.0
    lease_seconds: float = 60.0
    poll_interval: float = 1.0
    max_connections: int = 10
    ssl: bool = False
    ratio: float = 0.5
    queues: tuple[str, ...] = ()
    prefix: str = "conveyor"
    limit: int | None = None


def build(query: dict[str, str] | None = None, **overrides: object) -> BrokerOptions:
    return build_options(BrokerOptions, query, overrides, owner="test broker")


# ---------------------------------------------------------------- precedence


def test_defaults_apply_when_nothing_is_given() -> None:
    assert build() == BrokerOptions()


def test_the_url_query_overrides_the_default() -> None:
    assert build({"max_connections": "3"}).max_connections == 3


def test_a_keyword_overrides_the_url_query() -> None:
    options = build({"max_connections": "3", "prefix": "from-url"}, max_connections=7)
    assert options.max_connections == 7
    assert options.prefix == "from-url"


def test_options_come_straight_from_a_parsed_url() -> None:
    parsed = parse_url("redis://h/0?visibility_timeout=30&ssl=true&queues=a,b")
    options = build(dict(parsed.query), ssl=False)
    assert options.visibility_timeout == 30.0
    assert options.queues == ("a", "b")
    assert options.ssl is False


def test_the_result_is_frozen() -> None:
    options = build()
    with pytest.raises(FrozenInstanceError):
        options.prefix = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans_accept_the_usual_spellings(text: str, value: bool) -> None:
    assert build({"ssl": text}).ssl is value


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("3m", 180.0),
        ("1h", 3600.0),
        (" 10S ", 10.0),
    ],
)
def test_durations_accept_units_on_timeout_seconds_and_interval_options(
    text: str, seconds: float
) -> None:
    options = build({"visibility_timeout": text, "lease_seconds": text, "poll_interval": text})
    assert options.visibility_timeout == pytest.approx(seconds)
    assert options.lease_seconds == pytest.approx(seconds)
    assert options.poll_interval == pytest.approx(seconds)
    assert isinstance(options.visibility_timeout, float)


def test_a_plain_float_option_is_not_a_duration() -> None:
    assert build({"ratio": "0.75"}).ratio == 0.75
    with pytest.raises(ConfigurationError, match="'ratio'"):
        build({"ratio": "250ms"})


def test_integers_and_keyword_numbers_convert_to_the_field_type() -> None:
    options = build({"max_connections": "42"}, visibility_timeout=5)
    assert options.max_connections == 42
    assert options.visibility_timeout == 5.0
    assert isinstance(options.visibility_timeout, float)


def test_tuples_split_on_commas_and_drop_empty_parts() -> None:
    assert build({"queues": "high, default,,low"}).queues == ("high", "default", "low")
    assert build(queues=["a", "b"]).queues == ("a", "b")
    assert build({"queues": ""}).queues == ()


@pytest.mark.parametrize(("text", "value"), [("none", None), ("null", None), ("7", 7)])
def test_optional_options_accept_none(text: str, value: int | None) -> None:
    assert build({"limit": text}).limit == value
    assert build(limit=None).limit is None


def test_keyword_values_of_the_right_type_are_taken_as_given() -> None:
    options = build(ssl=True, queues=("x",), prefix="p")
    assert (options.ssl, options.queues, options.prefix) == (True, ("x",), "p")


# ---------------------------------------------------------------- errors


def test_an_unknown_query_option_fails_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError) as info:
        build({"visibilty_timeout": "10"})
    message = str(info.value)
    assert "unknown option 'visibilty_timeout' for test broker" in message
    assert "Did you mean 'visibility_timeout'?" in message
    assert "Known options: lease_seconds, limit, max_connections" in message


def test_an_unknown_keyword_option_fails_too() -> None:
    with pytest.raises(ConfigurationError, match="Did you mean 'max_connections'"):
        build(max_conections=3)


def test_an_unknown_option_with_no_close_match_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        build({"zzzz": "1"})
    assert "Did you mean" not in str(info.value)
    assert "Known options:" in str(info.value)


def test_keys_consumed_elsewhere_can_be_ignored() -> None:
    options = build_options(
        BrokerOptions, {"ssl_cert_reqs": "required", "ssl": "1"}, ignore={"ssl_cert_reqs"}
    )
    assert options.ssl is True


def test_the_owner_defaults_to_the_class_name() -> None:
    with pytest.raises(ConfigurationError, match="for BrokerOptions"):
        build_options(BrokerOptions, {"nope": "1"})


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ({"max_connections": "ten"}, "max_connections"),
        ({"max_connections": "1.5"}, "max_connections"),
        ({"ssl": "maybe"}, "ssl"),
        ({"visibility_timeout": "-1"}, "visibility_timeout"),
        ({"visibility_timeout": "soon"}, "visibility_timeout"),
        ({"visibility_timeout": "nan"}, "visibility_timeout"),
        ({"limit": "lots"}, "limit"),
    ],
)
def test_a_bad_value_names_the_option_and_the_owner(query: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(query)
    assert f"bad value for option {option!r} of test broker" in str(info.value)


# ---------------------------------------------------------------- helpers


def test_parse_seconds_takes_numbers_and_refuses_booleans_and_negatives() -> None:
    assert parse_seconds(2) == 2.0
    assert isinstance(parse_seconds(2), float)
    assert parse_seconds(0.5) == 0.5
    with pytest.raises(ValueError, match="boolean"):
        parse_seconds(True)
    with pytest.raises(ValueError, match="non-negative"):
        parse_seconds(-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        parse_seconds(math.nan)


def test_parse_bool_passes_booleans_through_and_refuses_other_words() -> None:
    assert parse_bool(True) is True
    assert parse_bool(" YES ") is True
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("2")


def test_closest_finds_a_near_name_or_nothing() -> None:
    assert closest("reddis", ["redis", "amqp"]) == "redis"
    assert closest("xyz", ["redis", "amqp"]) is None
    assert closest("anything", []) is None

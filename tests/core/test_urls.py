"""URL parsing, validation and password masking (conveyor.core.urls)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conveyor.core.errors import InvalidURL
from conveyor.core.urls import ParsedURL, mask_url, parse_url, scheme_of, split_alternates

# ---------------------------------------------------------------- parse_url


def test_host_port_and_path_are_parsed() -> None:
    parsed = parse_url("redis://localhost:6379/0")
    assert parsed.scheme == "redis"
    assert parsed.hosts == (("localhost", 6379),)
    assert (parsed.host, parsed.port) == ("localhost", 6379)
    assert parsed.path == "0"
    assert parsed.username is None
    assert parsed.password is None
    assert dict(parsed.query) == {}


def test_the_default_port_fills_in_a_missing_port_only() -> None:
    assert parse_url("redis://cache/0", default_port=6379).hosts == (("cache", 6379),)
    assert parse_url("redis://cache:6380/0", default_port=6379).hosts == (("cache", 6380),)
    assert parse_url("redis://cache/0").port is None


def test_the_default_host_applies_when_the_url_names_none() -> None:
    parsed = parse_url("redis:///0", default_host="localhost", default_port=6379)
    assert parsed.hosts == (("localhost", 6379),)
    assert parse_url("redis:///0").hosts == ()
    assert parse_url("redis:///0").host is None


def test_a_missing_host_is_refused_when_a_host_is_required() -> None:
    with pytest.raises(InvalidURL, match="names no host"):
        parse_url("redis:///0", require_host=True)
    with pytest.raises(InvalidURL, match="names no host"):
        parse_url("amqp://", require_host=True)


def test_the_scheme_is_lower_cased_and_may_contain_plus_signs() -> None:
    assert parse_url("REDIS://h/0").scheme == "redis"
    parsed = parse_url("sqla+postgresql+psycopg://app:pw@db:5432/app")
    assert parsed.scheme == "sqla+postgresql+psycopg"
    assert parsed.hosts == (("db", 5432),)
    assert parsed.path == "app"


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("redis://[::1]:6380/0", (("::1", 6380),)),
        ("redis://[::1]/0", (("::1", None),)),
        ("amqp://guest:guest@[2001:db8::5]:5672//", (("2001:db8::5", 5672),)),
    ],
)
def test_ipv6_hosts_are_written_in_brackets(url: str, hosts: tuple[tuple[str, int], ...]) -> None:
    assert parse_url(url).hosts == hosts


def test_an_unbracketed_ipv6_host_is_refused_with_how_to_write_it() -> None:
    with pytest.raises(InvalidURL, match=r"put IPv6 addresses in \[\.\.\.\]"):
        parse_url("redis://::1:6379/0")


def test_an_unclosed_bracket_is_refused() -> None:
    with pytest.raises(InvalidURL, match="unclosed"):
        parse_url("redis://[::1:6379/0")


def test_comma_separated_hosts_become_several_hosts() -> None:
    parsed = parse_url("mongodb://u:pw@h1:27017,h2:27018,[::1]/tasks?replicaSet=rs0")
    assert parsed.hosts == (("h1", 27017), ("h2", 27018), ("::1", None))
    assert parsed.path == "tasks"
    assert parsed.query["replicaSet"] == "rs0"
    assert (parsed.username, parsed.password) == ("u", "pw")


def test_an_empty_host_in_a_host_list_is_refused() -> None:
    with pytest.raises(InvalidURL, match="empty host"):
        parse_url("mongodb://h1:27017,,h2:27017/db")


def test_percent_encoded_credentials_are_decoded() -> None:
    parsed = parse_url("redis://us%40er:p%40ss%3Aw%2Fd%25@cache:6379/0")
    assert parsed.username == "us@er"
    assert parsed.password == "p@ss:w/d%"
    assert parsed.hosts == (("cache", 6379),)


def test_an_unencoded_at_sign_in_the_password_is_accepted() -> None:
    parsed = parse_url("amqp://guest:p@ss@rabbit:5672//")
    assert parsed.password == "p@ss"
    assert parsed.hosts == (("rabbit", 5672),)
    assert parsed.path == "/"


def test_a_user_without_password_and_a_password_without_user() -> None:
    only_user = parse_url("amqp://guest@rabbit//")
    assert (only_user.username, only_user.password) == ("guest", None)
    only_password = parse_url("redis://:s3cret@cache:6379/0")
    assert (only_password.username, only_password.password) == (None, "s3cret")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://cache:abc/0", "bad port 'abc'"),
        ("redis://cache:70000/0", "bad port 70000"),
        ("redis://cache:0/0", "bad port 0"),
        ("redis://cache:-1/0", "bad port '-1'"),
        ("redis://[::1]:x/0", "bad port 'x'"),
        ("redis://cache:/0", "empty port"),
        ("redis://ca che:6379/0", "bad host"),
    ],
)
def test_bad_ports_and_hosts_are_refused_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(InvalidURL, match=message):
        parse_url(url)


def test_an_error_about_a_url_masks_its_password() -> None:
    with pytest.raises(InvalidURL) as info:
        parse_url("redis://admin:hunter2@cache:port/0")
    assert "hunter2" not in str(info.value)
    assert "admin:***@cache" in str(info.value)


def test_query_parameters_are_parsed_and_a_repeated_key_keeps_the_last_value() -> None:
    parsed = parse_url("redis://h/0?visibility_timeout=30&ssl=&name=a%20b&x=1&x=2#frag")
    assert dict(parsed.query) == {"visibility_timeout": "30", "ssl": "", "name": "a b", "x": "2"}


def test_sqlite_paths_keep_their_slashes() -> None:
    assert parse_url("sqla+sqlite:///conveyor.db").path == "conveyor.db"
    assert parse_url("sqla+sqlite:////var/lib/conveyor.db").path == "/var/lib/conveyor.db"
    assert parse_url("sqla+sqlite:///conveyor.db").hosts == ()


@pytest.mark.parametrize("url", ["", "   ", "localhost:6379", "redis:/h", "://h"])
def test_empty_and_scheme_less_urls_are_invalid(url: str) -> None:
    with pytest.raises(InvalidURL):
        parse_url(url)


def test_scheme_of_returns_the_lower_cased_scheme() -> None:
    assert scheme_of("  Sqla+SQLite:///x.db") == "sqla+sqlite"
    assert scheme_of("mongodb+srv://cluster0.example.com/db") == "mongodb+srv"


# ---------------------------------------------------------------- ParsedURL never shows passwords


def test_the_password_is_never_in_repr_or_str_of_a_parsed_url() -> None:
    parsed = parse_url("amqp://guest:hunter2@rabbit:5672//?heartbeat=10")
    assert parsed.password == "hunter2"
    assert "hunter2" not in repr(parsed)
    assert "hunter2" not in str(parsed)
    assert str(parsed) == parsed.masked() == "amqp://guest:***@rabbit:5672//?heartbeat=10"


def test_masked_rebuilds_ipv6_and_multi_host_urls() -> None:
    parsed = parse_url("mongodb://u:pw@[::1]:27017,h2:27018/db")
    assert parsed.masked() == "mongodb://u:***@[::1]:27017,h2:27018/db"


def test_masked_url_without_credentials_is_unchanged_in_meaning() -> None:
    parsed = parse_url("redis://cache:6379/0")
    assert parsed.masked() == "redis://cache:6379/0"
    assert parse_url(parsed.masked()) == parsed


def test_parsed_urls_are_frozen() -> None:
    parsed = parse_url("redis://cache:6379/0")
    with pytest.raises(AttributeError):
        parsed.password = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        # the user name equals the password: both hidden
        ("amqp://guest:guest@rabbit:5672//", "amqp://***@rabbit:5672//"),
        ("amqp://guest:p@ss@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://u:p%40ss%3B@cache/0", "redis://u:***@cache/0"),
        ("sqla+postgresql+psycopg://app:pw@db/app", "sqla+postgresql+psycopg://app:***@db/app"),
        # alternates: the first scheme to the last '@' may all be credentials (a raw password
        # may hold ';' and '@'), so the hosts before the last one are hidden too
        ("amqp://u:one@h1:5672//;amqp://u:two@h2:5672//", "amqp://u:***@h2:5672//"),
        ("sentinel://:pw1@h1:26379;sentinel://:pw2@h2:26379", "sentinel://:***@h2:26379"),
    ],
)
def test_mask_url_hides_every_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "text",
    [
        "",
        "redis://cache:6379/0",
        "amqp://guest@rabbit//",
        "not a url at all",
        "host:port",
        "memory://",
        "sqla+sqlite:///conveyor.db",
    ],
)
def test_mask_url_leaves_text_without_a_password_alone(text: str) -> None:
    assert mask_url(text) == text


def test_mask_url_finds_urls_inside_a_message() -> None:
    message = "cannot reach redis://admin:hunter2@cache:6379/0 (connection refused)"
    assert mask_url(message) == "cannot reach redis://admin:***@cache:6379/0 (connection refused)"


# Passwords as they appear in a URL: percent-encoded (any text) or raw. A raw password can
# hold anything but whitespace and ';' (which separates alternates).
_any_password = st.text(min_size=4, max_size=40)
_raw_password = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters=";"
    ),
    min_size=4,
    max_size=40,
)


@given(password=_any_password)
def test_mask_url_never_shows_a_percent_encoded_password(password: str) -> None:
    encoded = quote(password, safe="")
    expected = "redis://admin:***@cache:6379/0"
    assume(password not in expected and encoded not in expected)
    masked = mask_url(f"redis://admin:{encoded}@cache:6379/0")
    assert masked == expected
    assert password not in masked
    assert encoded not in masked


@given(password=_raw_password)
def test_mask_url_never_shows_a_raw_password(password: str) -> None:
    expected = "amqp://guest:***@rabbit:5672//"
    assume(password not in expected)
    masked = mask_url(f"amqp://guest:{password}@rabbit:5672//")
    assert masked == expected
    assert password not in masked


@given(first=_any_password, second=_any_password)
def test_mask_url_never_shows_the_password_of_any_alternate(first: str, second: str) -> None:
    expected = "amqp://u:***@h2//"
    assume(first not in expected and second not in expected)
    url = f"amqp://u:{quote(first, safe='')}@h1//;amqp://u:{quote(second, safe='')}@h2//"
    masked = mask_url(url)
    assert masked == expected


@given(password=_any_password)
def test_a_parsed_url_round_trips_its_password_and_never_prints_it(password: str) -> None:
    parsed = parse_url(f"redis://admin:{quote(password, safe='')}@cache:6379/0")
    assert parsed.password == password
    without = ParsedURL(scheme="redis", hosts=(("cache", 6379),), username="admin", path="0")
    assume(password not in repr(without) and password not in "redis://admin:***@cache:6379/0")
    assert password not in repr(parsed)
    assert password not in str(parsed)


# ---------------------------------------------------------------- ';' alternates


def test_split_alternates_gives_each_part_the_first_scheme() -> None:
    assert split_alternates("cache+memcached://h1:11211;h2:11211/") == [
        "cache+memcached://h1:11211",
        "cache+memcached://h2:11211/",
    ]
    assert split_alternates("amqp://h1//; amqp://h2//") == ["amqp://h1//", "amqp://h2//"]
    assert split_alternates("redis://h/0") == ["redis://h/0"]


@pytest.mark.parametrize("url", ["", ";", " ; "])
def test_split_alternates_refuses_an_empty_url(url: str) -> None:
    with pytest.raises(InvalidURL):
        split_alternates(url)

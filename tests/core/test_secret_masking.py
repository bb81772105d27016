"""No secret survives masking: mask_url / mask_text / mask_options, the errors raised for bad
URLs and options, ``repr(Settings)`` and ``conveyor check`` (issue 13, item 5).

Secrets are generated as runs of marker tokens (``QZ<n>``) between arbitrary characters
(``@ : / ? # ; & = % '`` space, tab, ...), so a *partial* leak shows as a surviving ``QZ``:
no scheme, host, key, option name or message text contains that pair.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.core.errors import ConfigurationError, ConveyorError, InvalidURL
from conveyor.core.options import build_options
from conveyor.core.registry import broker_from_url, default_registry, result_backend_from_url
from conveyor.core.urls import (
    ParsedURL,
    is_public_option,
    is_secret_key,
    mask_options,
    mask_text,
    mask_url,
    parse_url,
    scheme_of,
    split_alternates,
)
from conveyor.runtime.config import Settings

MARK = "QZ"


def _schemes(kind: Any) -> list[str]:
    # Every scheme the registry knows, refused ones included; prefix schemes get a dialect.
    table = default_registry._tables[kind]
    return sorted(f"{name}+sqlite" if entry.prefix else name for name, entry in table.items())


ALL_SCHEMES = sorted({*_schemes("broker"), *_schemes("result_backend")})

_marker = st.integers(0, 999).map(lambda n: f"{MARK}{n}")
_special = st.sampled_from([*list("@:/?#;&=%' \t\"\\,()[]{}+-_.!~*$"), "é", "%40", "%3A", "a", "7"])
#: A secret: at least one marker, anything around it.
secrets = (
    st.lists(st.one_of(_marker, _special), min_size=1, max_size=12)
    .map("".join)
    .filter(lambda s: MARK in s)
)
#: A query value: a raw '&' ends a value for every URL parser, so it is not in a raw value.
query_secrets = secrets.filter(lambda s: "&" not in s)
_user = st.text(alphabet="abcxyz019-._@:%", min_size=0, max_size=8)
_host = st.sampled_from(["127.0.0.1", "cache", "h1,h2:27018", "[::1]", ""])
_port = st.one_of(st.none(), st.integers(1, 65535), st.just("x"))
_plain_key = st.sampled_from(["ssl", "visibility_timeout", "replicaSet", "authSource", "db"])
_secret_key = st.sampled_from(
    [
        "password",
        "sentinel_password",
        "ssl_keyfile_password",
        "tlsCertificateKeyFilePassword",
        "security_key",
        "access_key",
        "api_key",
        "auth_token",
        "client_secret",
        "passwd",
        "pwd",
        "PASSWORD",
        "pass%77ord",
        "authMechanismProperties",
    ]
)


@st.composite
def one_url(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(ALL_SCHEMES))
    auth = ""
    if draw(st.booleans()):
        password = draw(secrets)
        encode = draw(st.booleans())
        shown = quote(password, safe="") if encode else password
        auth = f"{draw(_user)}:{shown}@"
    elif draw(st.booleans()):
        auth = f"{draw(_user)}@"  # a user name alone is not a secret, and stays visible
    port = draw(_port)
    host = draw(_host) + ("" if port is None else f":{port}")
    path = draw(st.sampled_from(["", "/", "/0", "//", "/db"]))
    pairs = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            value = draw(query_secrets)
            pairs.append(f"{draw(_secret_key)}={quote(value) if draw(st.booleans()) else value}")
        else:
            pairs.append(f"{draw(_plain_key)}={draw(st.sampled_from(['1', 'true', 'rs0']))}")
    query = ("?" + "&".join(pairs)) if pairs else ""
    return f"{scheme}://{auth}{host}{path}{query}"


#: One URL, or ';'-joined alternates (a later one may drop its scheme, as memcached's do).
urls = st.lists(one_url(), min_size=1, max_size=3).map(
    lambda parts: ";".join(
        p if i == 0 or "QZ" in p else p.split("://", 1)[1] for i, p in enumerate(parts)
    )
)

_leaf = st.one_of(
    secrets,
    st.integers(),
    st.none(),
    st.booleans(),
    urls,
    secrets.map(lambda s: s.encode()),
)


def _options(depth: int = 2) -> st.SearchStrategy[dict[str, Any]]:
    """Option maps where every secret sits under a secret key or inside a URL."""
    inner = _options(depth - 1) if depth else st.just({})
    secret_values = st.one_of(_leaf, inner, st.lists(_leaf, max_size=3))
    plain_values = st.one_of(
        st.integers(),
        st.text(alphabet="abc019 ._-", max_size=10),
        urls,
        inner,
        st.lists(st.one_of(urls, inner), max_size=3),
    )
    return st.dictionaries(
        st.one_of(_secret_key, _plain_key), st.one_of(secret_values, plain_values), max_size=4
    ).map(lambda d: {k: v for k, v in d.items() if is_secret_key(k) or not _has_raw_secret(v)})


def _has_raw_secret(value: Any) -> bool:
    # A plain key's value may hold secrets only inside URLs (the masker sees those).
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        return MARK in text and "://" not in text
    if isinstance(value, dict):
        return False  # nested maps are filtered when built
    if isinstance(value, list):
        return any(_has_raw_secret(v) for v in value)
    return False


options = _options()


def _no_secret(text: str, where: str) -> None:
    assert MARK not in text, f"secret leaked in {where}: {text!r}"


# -------------------------------------------------------------------------- the maskers


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls)
def test_no_secret_survives_mask_url_or_mask_text(url: str) -> None:
    _no_secret(mask_url(url), "mask_url")
    _no_secret(mask_text(url), "mask_text")
    _no_secret(mask_text(f"Error 111 connecting to {url}. Connection refused."), "text")
    _no_secret(mask_text(repr(url)), "mask_text(repr)")
    _no_secret(mask_text(f"{{'url': {url!r}, 'n': 1}}"), "mask_text(dict repr)")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(opts=options)
def test_no_secret_survives_mask_options(opts: dict[str, Any]) -> None:
    _no_secret(repr(mask_options(opts)), "mask_options")
    _no_secret(repr(mask_options({"broker_transport_options": opts})), "nested mask_options")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls, opts=options, key=secrets)
def test_repr_of_settings_shows_no_secret(url: str, opts: dict[str, Any], key: str) -> None:
    conf = Settings()
    conf.update(
        broker_url=url,
        result_backend=url,
        security_key=[key, key.encode()],
        broker_transport_options=opts,
        result_backend_transport_options={"sentinel_kwargs": opts},
    )
    _no_secret(repr(conf), "repr(Settings)")


# ------------------------------------------------------------------ errors for bad URLs


def _errors_of(url: str) -> list[str]:
    texts: list[str] = []
    calls = [
        lambda: scheme_of(url),
        lambda: parse_url(url),
        lambda: [parse_url(p) for p in split_alternates(url)],
        lambda: default_registry.lookup("broker", url),
        lambda: default_registry.lookup("result_backend", url),
    ]
    for call in calls:
        try:
            got = call()
        except ConveyorError as exc:
            texts.append(str(exc))
        else:
            if isinstance(got, ParsedURL):
                texts += [repr(got), str(got)]
    return texts


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls)
def test_errors_raised_for_bad_urls_show_no_secret(url: str) -> None:
    for text in _errors_of(url):
        _no_secret(text, "URL error")


@pytest.mark.parametrize(
    ("kind", "scheme"),
    [(kind, scheme) for kind in ("broker", "result_backend") for scheme in _schemes(kind)],
)
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(password=secrets, value=query_secrets, path=st.sampled_from(["/0", "/db", ""]))
def test_building_from_a_bad_url_shows_no_secret(
    kind: str, scheme: str, password: str, value: str, path: str
) -> None:
    """Every registered implementation's ``from_url`` (where its driver is installed),
    refusing an unknown option before it connects anywhere."""
    url = (
        f"{scheme}://us:{quote(password, safe='')}@127.0.0.1:1{path}"
        f"?password={quote(value, safe='')}&conveyor_bogus_option=1"
    )
    factory = broker_from_url if kind == "broker" else result_backend_from_url
    try:
        built = factory(url)
    except ConveyorError as exc:
        _no_secret(str(exc), f"{kind} from_url error")
    else:  # some build lazily and take any query: then nothing was said about the URL
        _no_secret(repr(built), f"repr of a {kind}")
        built.close()


@settings(max_examples=200)
@given(key=st.one_of(_secret_key, _plain_key), value=secrets)
def test_option_errors_show_no_secret_value(key: str, value: str) -> None:
    import dataclasses

    cls = dataclasses.make_dataclass("Opts", [("password", int, 0), ("ssl", int, 0)])
    with pytest.raises(ConfigurationError) as info:
        build_options(cls, {key: value}, owner="test transport")
    text = str(info.value)
    if is_secret_key(key):  # the value of a plain option is no secret, and helps to see
        _no_secret(text, "build_options error")
    elif key == "ssl":  # a declared plain option: its bad value is named, to help
        assert "invalid literal" in text


# ------------------------------------------------------------------------ conveyor check


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(url=urls)
def test_conveyor_check_output_shows_no_secret(url: str) -> None:
    """The real CLI command, in-process; the bogus option stops every store before it
    connects (a server is not needed to see what is printed about a URL)."""
    from conveyor.cli import main

    sep = "&" if "?" in url.rsplit(";", 1)[-1] else "?"
    runner = CliRunner()
    result = runner.invoke(main, ["check", f"{url}{sep}conveyor_bogus_option=1", "-n", "1"])
    _no_secret(result.output, "conveyor check output")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        _no_secret(str(result.exception), "conveyor check exception")


def test_conveyor_check_errors_keep_their_type_and_lose_their_chain() -> None:
    from conveyor.runtime.check import run_check

    with pytest.raises(InvalidURL) as info:
        run_check(f"memory://u:{MARK}1@h:bad/0")
    assert MARK not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# ----------------------------------------------------------------------- exact examples


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h/0?password=hunter2&ssl=true", "redis://h/0?password=***&ssl=true"),
        ("sentinel://h:26379?sentinel_password=a%26b", "sentinel://h:26379?sentinel_password=***"),
        (
            "rediss://h/0?ssl_keyfile_password=k#x&ssl_cert_reqs=none",
            "rediss://h/0?ssl_keyfile_password=***&ssl_cert_reqs=none",
        ),
        (
            "mongodb://u:p@h/?tlsCertificateKeyFilePassword=x&authSource=admin",
            "mongodb://u:***@h/?tlsCertificateKeyFilePassword=***&authSource=admin",
        ),
        ("redis://u:pa ss?#;@h/0", "redis://u:***@h/0"),
        ("amqp://me@corp.com:pw@rabbit//", "amqp://***@rabbit//"),
        ("amqp://u:a;b@h1//;amqp://u:c@h2//", "amqp://u:***@h2//"),
        ("redis://u:p@h/0?ssl_options=%7B%27keyfile_password%27%3A%27x%27%7D", None),
    ],
)
def test_mask_url_examples(url: str, masked: str | None) -> None:
    got = mask_url(url)
    if masked is not None:
        assert got == masked
    for secret in ("hunter2", "a%26b", "pa ss", "pw", ":c@", "keyfile_password%27%3A%27x"):
        assert secret not in got


def test_mask_text_masks_pairs_and_loose_credentials() -> None:
    text = (
        "connect(host='h', password='p w\\'x', port=5432) failed; dsn: host=h password=s3 "
        'dbname=d; {"auth_token": "t0k"} via u:pw@h:6379'
    )
    masked = mask_text(text)
    for secret in ("p w", "x'", "s3", "t0k", ":pw@"):
        assert secret not in masked
    assert "host='h'" in masked
    assert "dbname=d" in masked
    assert "u:***@h:6379" in masked


def test_mask_options_hides_secret_keys_at_any_depth_and_keeps_the_rest() -> None:
    opts = {
        "password": "a",
        "sentinel_kwargs": {"password": "b", "socket_timeout": 1.5},
        "hosts": [{"url": "redis://u:c@h/0"}, ("x", {"api_key": "d"})],
        "ssl": {"keyfile_password": b"e", "cert_reqs": "none"},
        "visibility_timeout": 30,
    }
    assert mask_options(opts) == {
        "password": "***",
        "sentinel_kwargs": {"password": "***", "socket_timeout": 1.5},
        "hosts": [{"url": "redis://u:***@h/0"}, ("x", {"api_key": "***"})],
        "ssl": {"keyfile_password": "***", "cert_reqs": "none"},
        "visibility_timeout": 30,
    }


def test_mask_options_shows_objects_through_their_masked_repr_and_survives_cycles() -> None:
    class Creds:
        def __repr__(self) -> str:
            return "Creds(user='u', password='sekrit')"

    loop: dict[str, Any] = {"creds": Creds()}
    loop["self"] = loop
    text = repr(mask_options(loop))
    assert "sekrit" not in text
    assert "Creds(user='u'" in text
    assert "<...>" in text


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("sentinel_password", True),
        ("ssl_keyfile_password", True),
        ("tlsCertificateKeyFilePassword", True),
        ("security_key", True),
        ("access_key", True),
        ("API-KEY", True),
        ("auth_token", True),
        ("client_secret", True),
        ("passphrase", True),
        ("authMechanismProperties", True),
        ("ssl_keyfile", True),  # accepted false positive: a path, hidden anyway
        ("authSource", False),
        ("authMechanism", False),
        ("visibility_timeout", False),
        ("replicaSet", False),
        ("username", False),
        ("master_name", False),
    ],
)
def test_which_keys_name_a_secret(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_a_lone_user_name_stays_visible_and_guest_guest_hides_both() -> None:
    assert mask_url("amqp://guest@rabbit//") == "amqp://guest@rabbit//"
    assert mask_url("amqp://guest:guest@rabbit//") == "amqp://***@rabbit//"


def test_parse_url_refuses_a_raw_question_mark_or_hash_in_credentials_without_echoing_it() -> None:
    for url in (f"redis://u:pa?{MARK}1@h/0", f"redis://u:pa#{MARK}1@h/0", "redis://h/0?e=a@b"):
        with pytest.raises(InvalidURL, match="percent-encode") as info:
            parse_url(url)
        assert MARK not in str(info.value)


def test_split_alternates_refuses_a_raw_semicolon_in_a_password() -> None:
    with pytest.raises(InvalidURL, match="%3B") as info:
        split_alternates(f"amqp://u:pa;{MARK}1@h//")
    assert MARK not in str(info.value)
    with pytest.raises(InvalidURL, match="%3B") as info:
        split_alternates(f"amqp://u:pa;amqp://{MARK}2@h//")
    assert MARK not in str(info.value)
    assert split_alternates("amqp://u:p@h1//;amqp://u:p@h2//") == [
        "amqp://u:p@h1//",
        "amqp://u:p@h2//",
    ]


def test_a_bad_port_is_named_only_when_the_masked_url_shows_it() -> None:
    with pytest.raises(InvalidURL, match="bad port 'abc'"):
        parse_url("redis://cache:abc/0")
    with pytest.raises(InvalidURL) as info:
        parse_url(f"redis://u:{MARK}@h:1x/0")
    assert MARK not in str(info.value)


def test_masking_stays_linear_on_hostile_text() -> None:
    """Driver errors may quote user data; masking must not hang on it (no timing: the
    pytest timeout is the bound, and these finish in well under a second)."""
    for text in ("a" * 200_000, "?a=" * 50_000, "a:" * 100_000, "password=" * 20_000):
        mask_text(text)
        mask_url(text)


# ------------------------------------------------------- unknown query keys (misspelt secrets)

_unknown_key = st.sampled_from(
    ["pasword", "passowrd", "secrte", "pw", "tokne", "x", "conveyor_bogus_option", "Pass%77d"]
)


@given(key=_unknown_key, value=query_secrets)
def test_the_value_of_an_unknown_query_key_is_masked(key: str, value: str) -> None:
    """A misspelt secret key names no secret (``pasword``), but its value is one: every key
    that is not a known public option has its value masked, in a URL and in free text."""
    url = f"redis://127.0.0.1:6379/9?db=1&{key}={quote(value, safe='')}&ssl_cert_reqs=none"
    masked = mask_url(url)
    assert masked == f"redis://127.0.0.1:6379/9?db=1&{key}=***&ssl_cert_reqs=none"
    _no_secret(mask_text(f"cannot reach {url}: refused"), "mask_text")
    _no_secret(mask_text(f"{{'url': {url!r}}}"), "mask_text(repr)")
    _no_secret(str(parse_url(url)), "ParsedURL")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h/0?pasword=QZ1", "redis://h/0?pasword=***"),
        ("redis://h/0?db=3&visibility_timeout=30", "redis://h/0?db=3&visibility_timeout=30"),
        (
            "mongodb://h/db?replicaSet=rs0&authSource=admin&serverSelectionTimeoutMS=300",
            "mongodb://h/db?replicaSet=rs0&authSource=admin&serverSelectionTimeoutMS=300",
        ),
        ("mongodb://h/db?replicaset=rs0&tlsCAFile=/ca.pem", None),  # case-insensitive
        ("sqla+postgresql+psycopg://h/db?sslmode=require&conect_timeout=QZ2", None),
        # known keys that name a secret stay masked
        ("redis://h/0?sentinel_password=QZ3&ssl_keyfile=QZ4", None),
    ],
)
def test_known_public_options_stay_visible_and_nothing_else(url: str, masked: str | None) -> None:
    got = mask_url(url)
    if masked is not None:
        assert got == masked
    assert MARK not in got
    for key, _, value in (item.partition("=") for item in url.split("?", 1)[1].split("&")):
        assert (f"{key}={value}" in got) is is_public_option(key), (key, got)


def test_free_text_outside_urls_keeps_plain_pairs() -> None:
    text = "task done: state=SUCCESS retries=2, see redis://h/0?pasword=QZ9&db=1"
    assert mask_text(text) == "task done: state=SUCCESS retries=2, see redis://h/0?pasword=***&db=1"


def test_every_plain_option_of_every_implementation_is_public() -> None:
    """PUBLIC_OPTIONS lists conveyor's options by hand: a new plain option must be added
    there (else its value is masked, which is safe but unhelpful)."""
    import dataclasses
    import importlib

    modules = {
        "conveyor.transports.memory": "MemoryBrokerOptions",
        "conveyor.transports.redis": "RedisBrokerOptions",
        "conveyor.transports.amqp": "AMQPBrokerOptions",
        "conveyor.transports.mongodb": "MongoDBBrokerOptions",
        "conveyor.transports.sqlalchemy": "SQLAlchemyBrokerOptions",
        "conveyor.backends.memory": "MemoryResultBackendOptions",
        "conveyor.backends.redis": "RedisResultBackendOptions",
        "conveyor.backends.memcached": "MemcachedResultBackendOptions",
        "conveyor.backends.mongodb": "MongoDBResultBackendOptions",
        "conveyor.backends.rpc": "RPCResultBackendOptions",
        "conveyor.backends.sqlalchemy": "SQLAlchemyResultBackendOptions",
    }
    # Structured values (option maps, contexts, URLs) are masked whole on purpose.
    structured = {"sentinel_kwargs", "ssl_context", "broker_url"}
    checked = 0
    for module, name in modules.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:  # the unit env has no drivers; the other envs check those
            continue
        for f in dataclasses.fields(cls):
            if f.init and f.name not in structured and not is_secret_key(f.name):
                assert is_public_option(f.name), f"{name}.{f.name} is not in PUBLIC_OPTIONS"
                checked += 1
    assert checked > 0

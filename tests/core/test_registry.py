"""The scheme registry: Celery spellings, did-you-mean, refusals, registration, entry points.

Lookups of built-in schemes import the implementation module. To test the *mapping* in every
tox env, whatever is installed, ``stub_modules`` puts stand-in modules for the built-in
implementations and their drivers into ``sys.modules`` for one test: each stand-in class
records the ``module:Class`` it stands for. No server is involved anywhere in this file.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import textwrap
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conveyor import broker_from_url, result_backend_from_url
from conveyor.core.errors import (
    ConfigurationError,
    InvalidURL,
    MissingDependency,
    UnknownScheme,
)
from conveyor.core.registry import (
    BROKER_GROUP,
    RESULT_BACKEND_GROUP,
    Kind,
    Registry,
)

_T = "conveyor.transports"
_B = "conveyor.backends"
IMPLEMENTATIONS = {
    f"{_T}.memory": "MemoryBroker",
    f"{_T}.redis": "RedisBroker",
    f"{_T}.amqp": "AMQPBroker",
    f"{_T}.mongodb": "MongoDBBroker",
    f"{_T}.sqlalchemy": "SQLAlchemyBroker",
    f"{_B}.memory": "MemoryResultBackend",
    f"{_B}.redis": "RedisResultBackend",
    f"{_B}.rpc": "RPCResultBackend",
    f"{_B}.mongodb": "MongoDBResultBackend",
    f"{_B}.memcached": "MemcachedResultBackend",
    f"{_B}.sqlalchemy": "SQLAlchemyResultBackend",
}
DRIVERS = ("redis", "pika", "pymongo", "sqlalchemy", "pymemcache")


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)
    return module


@pytest.fixture
def stub_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for every built-in implementation module and every driver, for one test."""
    for module_name, class_name in IMPLEMENTATIONS.items():
        module = _stub_module(module_name)
        target = f"{module_name}:{class_name}"
        setattr(module, class_name, type(class_name, (), {"target": target}))
        monkeypatch.setitem(sys.modules, module_name, module)
    for driver in DRIVERS:
        monkeypatch.setitem(sys.modules, driver, _stub_module(driver))


@pytest.fixture
def registry() -> Registry:
    return Registry(load_entry_points=False)


BROKER_SPELLINGS = [
    ("memory://", f"{_T}.memory:MemoryBroker"),
    ("redis://localhost:6379/0", f"{_T}.redis:RedisBroker"),
    ("rediss://:pw@cache.example.com:6380/0", f"{_T}.redis:RedisBroker"),
    ("redis+socket:///run/redis/redis.sock", f"{_T}.redis:RedisBroker"),
    ("sentinel://h1:26379;sentinel://h2:26379", f"{_T}.redis:RedisBroker"),
    ("amqp://guest:guest@localhost:5672//", f"{_T}.amqp:AMQPBroker"),
    ("amqps://guest:guest@rabbit.example.com:5671//", f"{_T}.amqp:AMQPBroker"),
    ("pyamqp://guest@localhost//", f"{_T}.amqp:AMQPBroker"),
    ("mongodb://h1:27017,h2:27017/tasks", f"{_T}.mongodb:MongoDBBroker"),
    ("mongodb+srv://cluster0.example.com/tasks", f"{_T}.mongodb:MongoDBBroker"),
    ("sqla+postgresql+psycopg://app@db/app", f"{_T}.sqlalchemy:SQLAlchemyBroker"),
    ("sqla+sqlite:///conveyor.db", f"{_T}.sqlalchemy:SQLAlchemyBroker"),
    ("sqla+mysql+pymysql://root@127.0.0.1/test", f"{_T}.sqlalchemy:SQLAlchemyBroker"),
    ("sqlalchemy+sqlite:///conveyor.db", f"{_T}.sqlalchemy:SQLAlchemyBroker"),
    ("REDIS://LOCALHOST/0", f"{_T}.redis:RedisBroker"),
]
BACKEND_SPELLINGS = [
    ("memory://", f"{_B}.memory:MemoryResultBackend"),
    ("cache+memory://", f"{_B}.memory:MemoryResultBackend"),
    ("redis://localhost:6379/1", f"{_B}.redis:RedisResultBackend"),
    ("rediss://localhost:6380/1", f"{_B}.redis:RedisResultBackend"),
    ("redis+socket:///run/redis/redis.sock", f"{_B}.redis:RedisResultBackend"),
    ("sentinel://h1:26379;sentinel://h2:26379", f"{_B}.redis:RedisResultBackend"),
    ("rpc://", f"{_B}.rpc:RPCResultBackend"),
    ("mongodb://localhost:27017/results", f"{_B}.mongodb:MongoDBResultBackend"),
    ("mongodb+srv://cluster0.example.com/results", f"{_B}.mongodb:MongoDBResultBackend"),
    ("cache+memcached://h1:11211;h2:11211/", f"{_B}.memcached:MemcachedResultBackend"),
    ("memcached://localhost:11211", f"{_B}.memcached:MemcachedResultBackend"),
    ("db+sqlite:///results.db", f"{_B}.sqlalchemy:SQLAlchemyResultBackend"),
    ("db+postgresql+psycopg://app@db/app", f"{_B}.sqlalchemy:SQLAlchemyResultBackend"),
    ("database+sqlite:///results.db", f"{_B}.sqlalchemy:SQLAlchemyResultBackend"),
]


@pytest.mark.usefixtures("stub_modules")
@pytest.mark.parametrize(("url", "target"), BROKER_SPELLINGS)
def test_celery_broker_spellings_resolve_to_their_implementation(
    registry: Registry, url: str, target: str
) -> None:
    assert registry.lookup("broker", url).target == target


@pytest.mark.usefixtures("stub_modules")
@pytest.mark.parametrize(("url", "target"), BACKEND_SPELLINGS)
def test_celery_result_backend_spellings_resolve_to_their_implementation(
    registry: Registry, url: str, target: str
) -> None:
    assert registry.lookup("result_backend", url).target == target


@pytest.mark.parametrize(
    ("kind", "url", "extra", "driver"),
    [
        ("broker", "redis://localhost/0", "redis", "redis"),
        ("broker", "sentinel://h:26379", "redis", "redis"),
        ("broker", "amqp://localhost//", "amqp", "pika"),
        ("broker", "pyamqp://localhost//", "amqp", "pika"),
        ("broker", "mongodb+srv://cluster0.example.com/db", "mongodb", "pymongo"),
        ("broker", "sqla+sqlite:///x.db", "sqlalchemy", "sqlalchemy"),
        ("result_backend", "rpc://", "amqp", "pika"),
        ("result_backend", "cache+memcached://h:11211/", "memcached", "pymemcache"),
        ("result_backend", "db+sqlite:///r.db", "sqlalchemy", "sqlalchemy"),
    ],
)
def test_a_missing_driver_names_the_extra_that_installs_it(
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    kind: Kind,
    url: str,
    extra: str,
    driver: str,
) -> None:
    # A None entry in sys.modules makes the import system report the module as absent.
    monkeypatch.setitem(sys.modules, driver, None)
    with pytest.raises(MissingDependency) as info:
        registry.lookup(kind, url)
    assert info.value.extra == extra
    assert info.value.missing == driver
    assert f"pip install 'conveyor[{extra}]'" in str(info.value)


@pytest.mark.skipif(
    importlib.util.find_spec("redis") is not None,
    reason="redis is installed here; the `unit` tox env (no extras) runs this test",
)
def test_redis_url_without_the_redis_extra_says_what_to_pip_install() -> None:
    with pytest.raises(MissingDependency) as info:
        broker_from_url("redis://localhost:6379/0")
    assert "pip install 'conveyor[redis]'" in str(info.value)
    assert info.value.pip_command == "pip install 'conveyor[redis]'"


def test_a_registered_scheme_whose_driver_is_absent_raises_missing_dependency(
    registry: Registry,
) -> None:
    registry.register(
        "broker",
        "fakeq",
        "conveyor_test_no_such_impl:FakeBroker",
        extra="fakeq",
        requires="conveyor_test_no_such_driver",
    )
    with pytest.raises(MissingDependency) as info:
        registry.lookup("broker", "fakeq://localhost")
    assert info.value.missing == "conveyor_test_no_such_driver"
    assert "pip install 'conveyor[fakeq]'" in str(info.value)


def test_an_implementation_whose_module_imports_an_absent_driver_raises_missing_dependency(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "acme_needs_driver.py"
    module.write_text("import acme_absent_driver\n\nclass Broker: ...\n")
    monkeypatch.syspath_prepend(tmp_path)
    registry.register("broker", "needsdriver", "acme_needs_driver:Broker", extra="x")
    with pytest.raises(MissingDependency) as info:
        registry.lookup("broker", "needsdriver://h")
    assert info.value.missing == "acme_absent_driver"
    assert "pip install 'conveyor[x]'" in str(info.value)


# ---------------------------------------------------------------- unknown schemes


@pytest.mark.parametrize(
    ("kind", "url", "suggestion"),
    [
        ("broker", "reddis://x", "redis"),
        ("broker", "ampq://guest@localhost//", "amqp"),
        ("broker", "mongo://localhost/db", "mongodb"),
        ("broker", "postgresql://app@db/app", "sqla+postgresql"),
        ("broker", "sqla://", "sqla+sqlite"),
        ("result_backend", "postgresql://app@db/app", "db+postgresql"),
        ("result_backend", "reddis://x", "redis"),
        ("result_backend", "redis+sockt:///run/redis.sock", "redis+socket"),
    ],
)
def test_an_unknown_scheme_suggests_the_closest_known_one(
    registry: Registry, kind: Kind, url: str, suggestion: str
) -> None:
    with pytest.raises(UnknownScheme) as info:
        registry.lookup(kind, url)
    assert info.value.suggestion == suggestion
    assert f"Did you mean {suggestion!r}?" in str(info.value)


def test_an_unknown_scheme_lists_every_known_scheme(registry: Registry) -> None:
    with pytest.raises(UnknownScheme) as info:
        registry.lookup("broker", "https://example.com")
    message = str(info.value)
    assert info.value.scheme == "https"
    assert info.value.suggestion is None
    assert "Did you mean" not in message
    for scheme in ("amqp", "memory", "mongodb+srv", "redis", "sentinel", "sqla+<url>"):
        assert scheme in info.value.known
        assert scheme in message
    # Refused spellings are not offered as known broker schemes.
    assert "memcached" not in info.value.known
    assert "rpc" not in info.value.known


def test_known_schemes_show_prefix_schemes_with_a_url_placeholder(registry: Registry) -> None:
    brokers = registry.schemes("broker")
    backends = registry.schemes("result_backend")
    assert "sqla+<url>" in brokers
    assert "db+<url>" not in brokers
    assert "db+<url>" in backends
    assert {"rpc", "cache+memcached", "memcached"} <= set(backends)
    assert "amqp" not in backends
    assert brokers == sorted(brokers)


@pytest.mark.parametrize("url", ["", "   "])
def test_an_empty_url_is_invalid_not_a_default(registry: Registry, url: str) -> None:
    with pytest.raises(InvalidURL, match="empty URL"):
        registry.lookup("broker", url)


@pytest.mark.parametrize("url", ["localhost:6379", "redis:/localhost", "/var/run/redis.sock"])
def test_a_url_without_scheme_is_invalid(registry: Registry, url: str) -> None:
    with pytest.raises(InvalidURL, match="not a URL"):
        registry.lookup("broker", url)


@pytest.mark.parametrize("url", ["redis:/user:hunter2@localhost", "user:hunter2@localhost:6379"])
def test_a_malformed_url_error_never_shows_its_password(registry: Registry, url: str) -> None:
    with pytest.raises(InvalidURL) as info:
        registry.lookup("broker", url)
    assert "hunter2" not in str(info.value)


def test_a_kind_other_than_broker_or_result_backend_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="kind must be"):
        registry.lookup("queue", "memory://")  # type: ignore[arg-type]


# ---------------------------------------------------------------- refused schemes


@pytest.mark.parametrize(
    ("kind", "url", "explains"),
    [
        ("broker", "memcached://localhost:11211", "evicts entries"),
        ("broker", "cache+memcached://localhost:11211/", "evicts entries"),
        ("broker", "rpc://", "is a result backend"),
        ("broker", "db+sqlite:///x.db", "sqla+<sqlalchemy url>"),
        ("broker", "database+postgresql://h/db", "sqla+<sqlalchemy url>"),
        ("result_backend", "sqla+sqlite:///x.db", "db+<sqlalchemy url>"),
        ("result_backend", "amqp://localhost//", "rpc://"),
    ],
)
def test_a_known_scheme_of_the_wrong_kind_is_refused_with_the_reason(
    registry: Registry, kind: Kind, url: str, explains: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        registry.lookup(kind, url)
    assert not isinstance(info.value, UnknownScheme)
    assert explains in str(info.value)


def test_a_refusal_masks_the_password_of_the_url(registry: Registry) -> None:
    with pytest.raises(ConfigurationError) as info:
        registry.lookup("broker", "memcached://admin:hunter2@cache:11211")
    assert "hunter2" not in str(info.value)
    assert "admin:***@cache" in str(info.value)


# ---------------------------------------------------------------- register / unregister


class RecordingBroker:
    """Stands in for a third-party broker: ``from_url`` records what it was given."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RecordingBroker:
        return cls(url, options)


def test_a_registered_class_serves_its_scheme_with_url_and_options(registry: Registry) -> None:
    registry.register("broker", "acmeq", RecordingBroker)
    broker = broker_from_url("acmeq://h:1/x?a=1", registry=registry, prefetch=4)
    assert isinstance(broker, RecordingBroker)
    assert broker.url == "acmeq://h:1/x?a=1"
    assert broker.options == {"prefetch": 4}
    assert "acmeq" in registry.schemes("broker")
    assert "acmeq" not in registry.schemes("result_backend")


def test_a_registered_result_backend_serves_result_backend_from_url(registry: Registry) -> None:
    registry.register("result_backend", "acmer", RecordingBroker)
    backend = result_backend_from_url("acmer://h", registry=registry, ttl=5.0)
    assert isinstance(backend, RecordingBroker)
    assert backend.options == {"ttl": 5.0}


def test_a_registered_target_string_is_imported_on_first_lookup(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conveyor_test_lazy_impl.py").write_text("class LazyBroker:\n    pass\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "conveyor_test_lazy_impl", raising=False)
    registry.register("broker", "lazyq", "conveyor_test_lazy_impl:LazyBroker")
    assert "conveyor_test_lazy_impl" not in sys.modules
    cls = registry.lookup("broker", "lazyq://")
    assert cls.__name__ == "LazyBroker"
    assert "conveyor_test_lazy_impl" in sys.modules


def test_scheme_names_are_case_insensitive(registry: Registry) -> None:
    registry.register("broker", "AcmeQ", RecordingBroker)
    assert registry.lookup("broker", "ACMEQ://h") is RecordingBroker
    assert registry.lookup("broker", "acmeq://h") is RecordingBroker


def test_unregister_removes_a_registered_scheme(registry: Registry) -> None:
    registry.register("broker", "acmeq", RecordingBroker)
    registry.unregister("broker", "acmeq")
    with pytest.raises(UnknownScheme):
        registry.lookup("broker", "acmeq://h")
    registry.unregister("broker", "acmeq")  # idempotent


def test_a_prefix_scheme_matches_any_inner_url(registry: Registry) -> None:
    registry.register("broker", "acmesql", RecordingBroker, prefix=True)
    assert registry.lookup("broker", "acmesql+sqlite:///x.db") is RecordingBroker
    assert registry.lookup("broker", "acmesql+postgresql+psycopg://h/db") is RecordingBroker
    assert "acmesql+<url>" in registry.schemes("broker")
    with pytest.raises(UnknownScheme):
        registry.lookup("broker", "acmesql://h")


def test_registering_twice_needs_replace(registry: Registry) -> None:
    registry.register("broker", "acmeq", RecordingBroker)
    with pytest.raises(ConfigurationError, match="already registered"):
        registry.register("broker", "acmeq", RecordingBroker)
    registry.register("broker", "acmeq", "somewhere:Else", replace=True)


@pytest.mark.usefixtures("stub_modules")
def test_a_built_in_is_not_replaced_without_replace_true(registry: Registry) -> None:
    with pytest.raises(ConfigurationError, match="already built-in"):
        registry.register("broker", "redis", RecordingBroker)
    assert registry.lookup("broker", "redis://h").target == f"{_T}.redis:RedisBroker"

    registry.register("broker", "redis", RecordingBroker, replace=True)
    assert registry.lookup("broker", "redis://h") is RecordingBroker

    registry.unregister("broker", "redis")
    assert registry.lookup("broker", "redis://h").target == f"{_T}.redis:RedisBroker"


def test_registries_are_independent_of_each_other_and_of_the_default() -> None:
    first, second = Registry(load_entry_points=False), Registry(load_entry_points=False)
    first.register("broker", "acmeq", RecordingBroker)
    with pytest.raises(UnknownScheme):
        second.lookup("broker", "acmeq://h")
    with pytest.raises(UnknownScheme):
        broker_from_url("acmeq://h")


# ---------------------------------------------------------------- entry points


def _install_distribution(root: Path, entry_points: str, module: str) -> None:
    """Write an installed distribution (dist-info with entry_points.txt) plus its module."""
    dist_info = root / "conveyor_acme-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: conveyor-acme\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (root / "conveyor_acme.py").write_text(textwrap.dedent(module))


@pytest.fixture
def acme_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _install_distribution(
        tmp_path,
        f"""\
        [{BROKER_GROUP}]
        acme = conveyor_acme:AcmeBroker
        redis = conveyor_acme:HijackedRedis

        [{RESULT_BACKEND_GROUP}]
        acme = conveyor_acme:AcmeResultBackend
        """,
        """\
        class AcmeBroker:
            pass

        class AcmeResultBackend:
            pass

        class HijackedRedis:
            pass
        """,
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "conveyor_acme", raising=False)
    return tmp_path


@pytest.mark.usefixtures("acme_distribution")
def test_entry_points_add_broker_and_result_backend_schemes() -> None:
    registry = Registry()
    assert registry.lookup("broker", "acme://h").__name__ == "AcmeBroker"
    assert registry.lookup("result_backend", "acme://h").__name__ == "AcmeResultBackend"
    assert "acme" in registry.schemes("broker")


@pytest.mark.usefixtures("acme_distribution", "stub_modules")
def test_an_entry_point_never_replaces_a_built_in(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    with caplog.at_level(logging.WARNING, logger="conveyor.registry"):
        registry.schemes("broker")  # the first scan of the entry points
    assert registry.lookup("broker", "redis://h").target == f"{_T}.redis:RedisBroker"
    assert any("built-in scheme" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("acme_distribution")
def test_entry_points_are_not_loaded_when_disabled() -> None:
    registry = Registry(load_entry_points=False)
    with pytest.raises(UnknownScheme):
        registry.lookup("broker", "acme://h")


@pytest.mark.usefixtures("acme_distribution")
def test_entry_points_are_scanned_lazily_and_importing_waits_for_lookup() -> None:
    registry = Registry()
    assert "acme" in registry.schemes("broker")
    assert "conveyor_acme" not in sys.modules  # listed, not imported
    registry.lookup("broker", "acme://h")
    assert "conveyor_acme" in sys.modules


def test_an_entry_point_name_ending_in_plus_declares_a_prefix_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_distribution(
        tmp_path,
        f"""\
        [{BROKER_GROUP}]
        acmesql+ = conveyor_acme:AcmeSQLBroker
        """,
        "class AcmeSQLBroker:\n    pass\n",
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "conveyor_acme", raising=False)
    registry = Registry()
    assert registry.lookup("broker", "acmesql+sqlite:///x.db").__name__ == "AcmeSQLBroker"
    assert "acmesql+<url>" in registry.schemes("broker")


# ---------------------------------------------------------------- the real memory scheme


def test_memory_url_builds_a_working_broker_and_result_backend() -> None:
    pytest.importorskip("conveyor.transports.memory", reason="memory transport not in tree")
    pytest.importorskip("conveyor.backends.memory", reason="memory backend not in tree")
    from conveyor import Envelope, ResultRecord, State

    broker = broker_from_url("memory://")
    try:
        broker.publish(Envelope(id="m1", body=b"\x00payload"), queue="registry-test")
        (delivery,) = broker.receive("registry-test", timeout=1.0)
        assert delivery.envelope.body == b"\x00payload"
        broker.ack(delivery)
        assert broker.receive("registry-test", timeout=0) == []
    finally:
        broker.close()

    backend = result_backend_from_url("memory://")
    try:
        backend.store(ResultRecord(task_id="t1", state=State.SUCCESS, result=42))
        record = backend.fetch("t1")
        assert record is not None
        assert (record.state, record.result) == (State.SUCCESS, 42)
    finally:
        backend.close()

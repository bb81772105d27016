"""The exception tree (conveyor.core.errors): grouping by what the caller can do, messages."""

from __future__ import annotations

import builtins

import pytest

import conveyor
from conveyor.core import errors
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ContentDisallowed,
    ConveyorError,
    DecodeError,
    EncodeError,
    InvalidReceipt,
    InvalidURL,
    MissingDependency,
    OperationalError,
    OperationTimeout,
    QueueNotFound,
    SerializationError,
    TaskError,
    UnknownScheme,
    UnsupportedFeature,
)

TREE = {
    ConfigurationError: ConveyorError,
    InvalidURL: ConfigurationError,
    UnknownScheme: ConfigurationError,
    MissingDependency: ConfigurationError,
    UnsupportedFeature: ConveyorError,
    SerializationError: ConveyorError,
    EncodeError: SerializationError,
    DecodeError: SerializationError,
    ContentDisallowed: SerializationError,
    QueueNotFound: ConveyorError,
    InvalidReceipt: ConveyorError,
    TaskError: ConveyorError,
    OperationalError: ConveyorError,
    ConnectionLost: OperationalError,
    OperationTimeout: OperationalError,
}


@pytest.mark.parametrize(("error", "parent"), TREE.items(), ids=lambda c: c.__name__)
def test_each_error_sits_under_the_parent_that_says_what_to_do(
    error: type[Exception], parent: type[Exception]
) -> None:
    assert error.__bases__ == (parent,)


def test_every_exported_error_is_in_the_tree() -> None:
    exported = {getattr(errors, name) for name in errors.__all__}
    assert exported == {*TREE, ConveyorError}
    assert ConveyorError.__bases__ == (Exception,)


def test_no_error_name_shadows_a_builtin() -> None:
    assert not set(errors.__all__) & set(dir(builtins))


def test_errors_are_re_exported_from_the_package_root() -> None:
    for name in errors.__all__:
        assert getattr(conveyor, name) is getattr(errors, name)


def _connect() -> None:
    """What an implementation's one translation point does with a driver error."""
    try:
        raise OSError("connection refused")
    except OSError as exc:
        raise ConnectionLost("redis at redis://cache:6379/0 is not reachable") from exc


def test_transient_failures_are_caught_as_operational_errors_and_keep_their_cause() -> None:
    with pytest.raises(OperationalError) as info:
        _connect()
    assert isinstance(info.value, ConnectionLost)
    assert isinstance(info.value.__cause__, OSError)
    assert not isinstance(info.value, ConfigurationError)


def test_unknown_scheme_carries_the_scheme_the_sorted_known_list_and_a_suggestion() -> None:
    error = UnknownScheme("reddis", ["redis", "amqp", "redis"], kind="broker", suggestion="redis")
    assert (error.scheme, error.kind, error.suggestion) == ("reddis", "broker", "redis")
    assert error.known == ["amqp", "redis"]
    assert str(error) == (
        "unknown broker scheme 'reddis'. Did you mean 'redis'? Known schemes: amqp, redis."
    )


def test_unknown_scheme_without_a_suggestion_does_not_guess() -> None:
    error = UnknownScheme("https", ["redis"], kind="result backend")
    assert str(error) == "unknown result backend scheme 'https'. Known schemes: redis."


def test_missing_dependency_gives_the_pip_command() -> None:
    error = MissingDependency("rediss", "redis", "redis")
    assert error.pip_command == "pip install 'conveyor[redis]'"
    assert (error.scheme, error.extra, error.missing) == ("rediss", "redis", "redis")
    assert "the 'rediss' scheme needs the 'redis' package" in str(error)
    assert str(error).endswith("run pip install 'conveyor[redis]'")


def test_unsupported_feature_names_the_implementation_and_capability() -> None:
    error = UnsupportedFeature("conveyor.transports.memory.MemoryBroker", "priority", "priority=5")
    assert (error.implementation, error.capability) == (
        "conveyor.transports.memory.MemoryBroker",
        "priority",
    )
    assert str(error) == (
        "conveyor.transports.memory.MemoryBroker does not support 'priority': priority=5"
    )
    assert str(UnsupportedFeature("X", "wait")) == "X does not support 'wait'"


def test_content_disallowed_names_the_type_and_the_sorted_accept_list() -> None:
    error = ContentDisallowed("application/x-python-serialize", {"json", "application/x-msgpack"})
    assert error.content_type == "application/x-python-serialize"
    assert error.accepted == ["application/x-msgpack", "json"]
    assert "refusing to decode content type 'application/x-python-serialize'" in str(error)


def test_task_error_keeps_the_remote_exception_and_omits_the_builtins_module() -> None:
    error = TaskError("KeyError", ("missing",), "builtins", "Traceback ...")
    assert str(error) == "KeyError: ('missing',)"
    assert (error.exc_type, error.exc_module, error.remote_traceback) == (
        "KeyError",
        "builtins",
        "Traceback ...",
    )
    custom = TaskError("PaymentDeclined", "card expired", "shop.errors")
    assert str(custom) == "shop.errors.PaymentDeclined: 'card expired'"
    assert custom.remote_traceback is None

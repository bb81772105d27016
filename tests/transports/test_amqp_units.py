"""AMQP transport pieces that need no server: URLs, options, header encoding, delay routing,
error translation."""

from __future__ import annotations

import re
import ssl
import struct
from typing import Any

import pika
import pika.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika.adapters.utils import connection_workflow as workflow

from conveyor._drivers.amqp.errors import translate_error
from conveyor._drivers.amqp.options import connection_parameters
from conveyor.backends.rpc import RPCResultBackend
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    EncodeError,
    InvalidURL,
    OperationalError,
    OperationTimeout,
    QueueNotFound,
)
from conveyor.core.registry import default_registry
from conveyor.transports.amqp import (
    DELAY_LEVELS,
    DELAY_RESOLUTION,
    AMQPBroker,
    AMQPBrokerOptions,
    AMQPPriorityBroker,
    Properties,
    check_message_size,
    parse_amqp_url,
    redact_url,
    topology,
)

# ================================================================================ URLs


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://guest:guest@localhost:5672//", "/"),
        ("amqp://guest:guest@localhost:5672/", "/"),
        ("amqp://guest:guest@localhost:5672", "/"),
        ("amqp://localhost/%2F", "/"),
        ("amqp://localhost/prod", "prod"),
        ("pyamqp://localhost/a%2Fb", "a/b"),
    ],
)
def test_the_vhost_is_read_as_kombu_reads_it(url: str, vhost: str) -> None:
    [endpoint], _query = parse_amqp_url(url)
    assert endpoint.vhost == vhost


def test_credentials_default_to_guest_and_ports_to_the_scheme() -> None:
    [plain], _ = parse_amqp_url("amqp://rabbit")
    assert (plain.host, plain.port, plain.username, plain.password) == (
        "rabbit",
        5672,
        "guest",
        "guest",
    )
    [tls], _ = parse_amqp_url("amqps://u:p%40ss@rabbit")
    assert (tls.port, tls.tls, tls.username, tls.password) == (5671, True, "u", "p@ss")


def test_alternates_and_comma_hosts_give_failover_order() -> None:
    endpoints, query = parse_amqp_url(
        "amqp://a:1@h1:5673//;amqp://b:2@h2/vh?heartbeat=5;amqp://h3,h4:5680//"
    )
    assert [(e.host, e.port, e.vhost, e.username) for e in endpoints] == [
        ("h1", 5673, "/", "a"),
        ("h2", 5672, "vh", "b"),
        ("h3", 5672, "/", "guest"),
        ("h4", 5680, "/", "guest"),
    ]
    assert query == {"heartbeat": "5"}


def test_a_non_amqp_url_is_refused() -> None:
    with pytest.raises(InvalidURL):
        parse_amqp_url("redis://localhost:6379/0")


def test_the_registry_maps_every_celery_spelling_to_the_amqp_broker() -> None:
    for scheme in ("amqp", "amqps", "pyamqp"):
        assert default_registry.lookup("broker", f"{scheme}://h//") is AMQPBroker


def test_passwords_never_show_and_a_user_equal_to_the_password_is_masked_too() -> None:
    text = redact_url("amqp://guest:guest@h1//;amqp://bob:s3cret@h2/prod")
    assert "guest" not in text
    assert "s3cret" not in text
    assert "***@h2" in text  # alternates read as one URL by mask_url: nothing leaks either way
    broker = AMQPBroker.from_url("amqp://bob:s3cret@h2/prod")
    assert "s3cret" not in repr(broker)
    assert "s3cret" not in str(broker.link.endpoints)
    broker.close()


# ================================================================================ options


def test_unknown_options_fail_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        AMQPBroker.from_url("amqp://h//?lease_second=3")


def test_max_priority_selects_the_priority_class_with_its_capability() -> None:
    plain = AMQPBroker.from_url("amqp://h//")
    prio = AMQPBroker.from_url("amqp://h//?max_priority=10")
    try:
        assert type(plain) is AMQPBroker
        assert type(prio) is AMQPPriorityBroker
        assert "priority" in {c.value for c in prio.capabilities}
        assert "priority" not in {c.value for c in plain.capabilities}
        assert prio.options.max_priority == 10
    finally:
        plain.close()
        prio.close()
    with pytest.raises(ConfigurationError):
        AMQPPriorityBroker.from_url("amqp://h//")
    with pytest.raises(ConfigurationError):
        AMQPBroker(parse_amqp_url("amqp://h//")[0], AMQPBrokerOptions(max_priority=5))


@pytest.mark.parametrize(
    "options",
    [
        {"queue_type": "quorum", "max_priority": 5},
        {"queue_type": "stream"},
        {"dead_letter": "drop"},
        {"delivery_limit": 3},
        {"prefetch_count": 0},
        {"max_priority": 256},
        {"lease_seconds": 0},
        {"ssl_cert_reqs": "sometimes"},
        {"retry_interval": 5, "max_retry_interval": 1},
        {"max_message_size": 0},
        {"max_message_size": -1},
        {"max_message_size": True},
        {"max_message_size": "128MiB"},
    ],
)
def test_bad_option_combinations_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        AMQPBroker.from_url("amqp://h//", **options)


def test_max_message_size_defaults_to_rabbitmqs_and_is_read_from_either_url() -> None:
    assert AMQPBrokerOptions().max_message_size == 128 * 1024 * 1024
    broker = AMQPBroker.from_url("amqp://h//?max_message_size=1048576")
    try:
        assert broker.options.max_message_size == 1 << 20
    finally:
        broker.close()
    backend = RPCResultBackend.from_url("rpc://", broker_url="amqp://h//?max_message_size=4096")
    try:
        assert backend.options.max_message_size == 4096
    finally:
        backend.close()


def test_a_body_over_max_message_size_is_an_encode_error_not_a_transient_one() -> None:
    check_message_size(b"x" * 10, 10)
    with pytest.raises(EncodeError, match=r"11 bytes.*max_message_size \(10 bytes") as info:
        check_message_size(b"x" * 11, 10, "message m1")
    assert not isinstance(info.value, OperationalError)
    assert str(info.value).startswith("message m1 cannot be sent")


def test_amqps_verifies_the_server_certificate_by_default() -> None:
    [endpoint], _ = parse_amqp_url("amqps://rabbit.example//")
    params = connection_parameters(endpoint, AMQPBrokerOptions(), name="t")
    context = params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert params.ssl_options.server_hostname == "rabbit.example"
    relaxed = connection_parameters(
        endpoint, AMQPBrokerOptions(ssl_cert_reqs="CERT_NONE"), name="t"
    )
    assert relaxed.ssl_options.context.verify_mode == ssl.CERT_NONE
    [plain], _ = parse_amqp_url("amqp://rabbit//")
    assert connection_parameters(plain, AMQPBrokerOptions(), name="t").ssl_options is None


def test_connection_parameters_carry_heartbeat_timeouts_and_vhost() -> None:
    [endpoint], _ = parse_amqp_url("amqp://u:p@h:5999/v")
    params = connection_parameters(
        endpoint, AMQPBrokerOptions(heartbeat=15.4, connect_timeout=3.0), name="conn"
    )
    assert (params.host, params.port, params.virtual_host) == ("h", 5999, "v")
    assert params.heartbeat == 15
    assert params.socket_timeout == 3.0
    assert params.connection_attempts == 1
    assert params.client_properties["connection_name"] == "conn"


# ================================================================================ headers


def _round_trip(**fields: Any) -> Any:
    encoded = b"".join(Properties(**fields).encode())
    decoded = pika.BasicProperties()
    decoded.decode(encoded)
    return decoded


header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(min_size=1, max_size=12), header_values, max_size=6))
def test_headers_round_trip_through_amqp_field_tables(headers: dict[str, Any]) -> None:
    assert _round_trip(headers=headers).headers == headers


def test_floats_are_doubles_on_the_wire_as_py_amqp_sends_them() -> None:
    encoded = b"".join(Properties(headers={"timelimit": [1.5, None]}).encode())
    assert b"d" + struct.pack(">d", 1.5) in encoded
    assert _round_trip(headers={"timelimit": (1.5, None)}).headers == {"timelimit": [1.5, None]}


def test_every_property_conveyor_sends_round_trips() -> None:
    fields: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {"task": "t", "id": "x"},
        "delivery_mode": 2,
        "priority": 7,
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "1000",
        "message_id": "m",
    }
    got = _round_trip(**fields)
    assert {k: getattr(got, k) for k in fields} == fields
    assert _round_trip().headers is None


# ================================================================================ delays


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` one word, ``#`` zero or more words."""
    parts = []
    for word in pattern.split("."):
        parts.append({"*": r"[^.]+", "#": r"(?:[^.]+(?:\.[^.]+)*)?"}.get(word, re.escape(word)))
    regex = r"\.".join(parts).replace(r"(?:[^.]+(?:\.[^.]+)*)?\.", r"(?:[^.]+\.)*")
    return re.fullmatch(regex, key) is not None


def _bindings(queue: str, levels: range) -> dict[str, list[tuple[str, str]]]:
    """exchange -> [(pattern, destination)] as the broker declares them."""
    token = topology._target_token(queue)
    table: dict[str, list[tuple[str, str]]] = {}
    for level in range(DELAY_LEVELS):
        source = topology._delay_exchange(level)
        table.setdefault(source, []).append(
            (topology._pattern(level, "0", "#"), topology._delay_exchange(level - 1))
        )
    for level in levels:
        table[topology._delay_exchange(level)].append(
            (
                topology._pattern(level, "1", "*." * level + token),
                "queue:" + topology.delay_queue_name(queue, level),
            )
        )
    table.setdefault(topology._delay_exchange(-1), []).append(("#." + token, "queue:" + queue))
    return table


@given(st.floats(min_value=0.001, max_value=topology.MAX_DELAY), st.text(min_size=1, max_size=30))
def test_a_delay_is_routed_through_its_set_bits_and_never_arrives_early(
    delay: float, queue: str
) -> None:
    units = topology._delay_units(delay)
    assert units * DELAY_RESOLUTION >= delay - 1e-6  # rounded up: never early
    assert units * DELAY_RESOLUTION < delay + DELAY_RESOLUTION + 1e-6
    levels = [lv for lv in range(DELAY_LEVELS) if units >> lv & 1]
    key = topology._routing_key(units, topology._target_token(queue))
    table = _bindings(queue, range(DELAY_LEVELS))
    # Walk RabbitMQ's routing: exchanges by binding; a TTL queue dead-letters to its
    # x-dead-letter-exchange (the next level down) keeping the routing key.
    exchange: str | None = topology._delay_exchange(max(levels))
    visited, held_ms = [], 0
    while exchange is not None:
        targets = [dest for pattern, dest in table[exchange] if _topic_match(pattern, key)]
        assert len(targets) == 1, (exchange, targets)
        [dest] = targets
        if dest == "queue:" + queue:
            exchange = None
        elif dest.startswith("queue:"):
            level = int(dest.rsplit(".", 1)[1])
            visited.append(level)
            held_ms += 100 * 2**level
            exchange = topology._delay_exchange(level - 1)
        else:
            exchange = dest
    assert visited == sorted(levels, reverse=True)
    assert held_ms == units * 100


def test_delays_beyond_the_longest_level_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        topology._delay_units(topology.MAX_DELAY + 1)


def test_delay_records_are_stripped_but_real_dead_lettering_is_kept() -> None:
    delay = {"exchange": "conveyor.delay.3", "reason": "expired", "queue": "q.conveyor.delay.3"}
    real = {"exchange": "", "reason": "rejected", "queue": "q"}
    only_delay = {
        "x-death": [delay],
        "x-first-death-exchange": "conveyor.delay.3",
        "x-first-death-queue": "q.conveyor.delay.3",
        "x-first-death-reason": "expired",
        "task": "t",
    }
    topology._strip_delay_deaths(only_delay)
    assert only_delay == {"task": "t"}
    mixed = {"x-death": [real, delay], "x-first-death-exchange": "", "task": "t"}
    topology._strip_delay_deaths(mixed)
    assert mixed == {"x-death": [real], "x-first-death-exchange": "", "task": "t"}


def test_long_queue_names_get_hashed_delay_queue_names_within_255_bytes() -> None:
    name = "é" * 120  # 240 bytes
    assert len(topology.delay_queue_name(name, 31).encode()) <= 255
    assert topology.delay_queue_name("jobs", 4) == "jobs.conveyor.delay.4"


# ================================================================================ errors


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'x'"), QueueNotFound),
        (
            pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"),
            ConfigurationError,
        ),
        (pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED"), ConfigurationError),
        (pika.exceptions.ChannelClosedByBroker(541, "INTERNAL_ERROR"), OperationalError),
        (pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"), ConfigurationError),
        (pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED"), ConnectionLost),
        (pika.exceptions.StreamLostError("reset"), ConnectionLost),
        (pika.exceptions.AMQPHeartbeatTimeout("missed"), ConnectionLost),
        (ConnectionRefusedError(111, "refused"), ConnectionLost),
        (workflow.AMQPConnectorStackTimeout("slow"), OperationTimeout),
        (
            workflow.AMQPConnectionWorkflowFailed(
                [
                    workflow.AMQPConnectorSocketConnectError(ConnectionRefusedError()),
                    workflow.AMQPConnectorAMQPHandshakeError(
                        pika.exceptions.ProbableAccessDeniedError("vhost")
                    ),
                ]
            ),
            ConfigurationError,
        ),
        (pika.exceptions.UnroutableError([]), OperationalError),
    ],
)
def test_pika_errors_are_translated_in_one_place(
    error: BaseException, expected: type[Exception]
) -> None:
    translated = translate_error(error, what="test")
    assert type(translated) is expected
    assert str(translated).startswith("test")

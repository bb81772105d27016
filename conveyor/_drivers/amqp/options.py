"""AMQP connection options and URLs, shared by the AMQP broker and the ``rpc://`` backend.

:class:`AMQPConnectionOptions` (the options both take), :func:`parse_amqp_url` (kombu's
reading of ``amqp://``, ``amqps://`` and ``pyamqp://`` URLs, ``;`` alternates),
:func:`redact_url`, :func:`connection_parameters` (pika's parameters for one host) and
:func:`check_message_size`. The options are documented in
:mod:`conveyor.transports.amqp` and ``docs/stores/amqp.md``. Private plumbing.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pika

from conveyor.core.errors import ConfigurationError, ConveyorError, EncodeError, InvalidURL
from conveyor.core.urls import mask_url, parse_url, split_alternates

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AMQPConnectionOptions",
    "AMQPEndpoint",
    "check_message_size",
    "check_positive",
    "connection_parameters",
    "parse_amqp_url",
    "redact_url",
]

#: The ``max_message_size`` option's default: RabbitMQ's own default (128 MiB), in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 128 << 20

_SCHEMES = ("amqp", "amqps", "pyamqp")
_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}


# ============================================================================== options


@dataclass(frozen=True)
class AMQPConnectionOptions:
    """Connection options shared by :class:`AMQPBroker` and the ``rpc://`` backend.

    Attributes:
        heartbeat: AMQP heartbeat timeout in seconds (rounded to whole seconds; 0 disables).
        connect_timeout: seconds for one TCP + TLS + AMQP handshake to one host.
        operation_timeout: the longest any call waits for RabbitMQ, including waiting for a
            dropped connection to come back.
        retry_interval: first pause between reconnect attempts; doubles each failure.
        max_retry_interval: cap of that pause.
        ssl_ca_certs: CA bundle for ``amqps://`` (None: the system's).
        ssl_certfile: client certificate (PEM) for mutual TLS.
        ssl_keyfile: its private key (PEM).
        ssl_cert_reqs: ``required`` (default), ``optional`` or ``none``.
        ssl_check_hostname: check the server certificate's host name.
        ssl_context: a ready :class:`ssl.SSLContext`; overrides the ``ssl_*`` fields.
        connection_name: shown in RabbitMQ's management UI and ``rabbitmqctl``.
        max_message_size: the largest body, in bytes, a publish (or an ``rpc://`` result)
            may carry; a bigger one raises ``EncodeError`` before anything is sent. Default
            128 MiB, RabbitMQ's default ``max_message_size``: set the server's value.
    """

    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    operation_timeout: float = 10.0
    retry_interval: float = 0.2
    max_retry_interval: float = 2.0
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    ssl_context: Any = None
    connection_name: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "operation_timeout", "retry_interval"):
            check_positive(name, getattr(self, name))
        size = self.max_message_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"max_message_size must be a number of bytes >= 1: {size!r}")
        if not (math.isfinite(self.heartbeat) and self.heartbeat >= 0):
            raise ConfigurationError(f"heartbeat must be >= 0 seconds: {self.heartbeat!r}")
        if self.max_retry_interval < self.retry_interval:
            raise ConfigurationError("max_retry_interval must be >= retry_interval")
        if _cert_reqs(self.ssl_cert_reqs) is None:
            raise ConfigurationError(
                f"ssl_cert_reqs must be required, optional or none, not {self.ssl_cert_reqs!r}"
            )
        if self.ssl_context is not None and not isinstance(self.ssl_context, ssl.SSLContext):
            raise ConfigurationError("ssl_context must be an ssl.SSLContext")


def check_message_size(body: bytes, limit: int, what: str = "message") -> None:
    """Refuse a body RabbitMQ would take for a reason to close the connection.

    Raises:
        EncodeError: ``body`` is longer than ``limit`` bytes (the ``max_message_size``
            option): not transient, sending it again cannot succeed.
    """
    if len(body) > limit:
        raise EncodeError(
            f"{what} cannot be sent over AMQP: its body takes {len(body)} bytes, more than "
            f"max_message_size ({limit} bytes; RabbitMQ closes the connection over its own "
            "max_message_size, 128 MiB by default)"
        )


def check_positive(name: str, value: Any) -> None:
    """Refuse anything but a finite number of seconds > 0 (option checks)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")


def _cert_reqs(text: str) -> ssl.VerifyMode | None:
    return _CERT_REQS.get(str(text).strip().lower())


# ============================================================================== URLs


@dataclass(frozen=True)
class AMQPEndpoint:
    """One host to connect to. ``password`` never appears in ``repr``."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: bool = False

    def __str__(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{self.vhost}"


def parse_amqp_url(url: str) -> tuple[list[AMQPEndpoint], dict[str, str]]:
    """Parse ``amqp://``/``amqps://``/``pyamqp://`` URLs (``;`` alternates) as kombu does.

    Returns:
        The endpoints in failover order and the merged query parameters (a later
        alternate's key overrides an earlier one's).

    Raises:
        InvalidURL: a scheme that is not AMQP, a bad host or port.
    """
    endpoints: list[AMQPEndpoint] = []
    query: dict[str, str] = {}
    for alternate in split_alternates(url):
        parsed = parse_url(alternate, default_host="localhost")
        if parsed.scheme not in _SCHEMES:
            raise InvalidURL(
                f"{mask_url(alternate)!r} is not an AMQP URL (amqp://, amqps://, pyamqp://)"
            )
        tls = parsed.scheme == "amqps"
        vhost = parsed.path or "/"
        for host, port in parsed.hosts:
            endpoints.append(
                AMQPEndpoint(
                    host=host,
                    port=port if port is not None else (5671 if tls else 5672),
                    vhost=vhost,
                    username=parsed.username if parsed.username is not None else "guest",
                    password=parsed.password if parsed.password is not None else "guest",
                    tls=tls,
                )
            )
        query.update(parsed.query)
    return endpoints, query


def redact_url(url: str) -> str:
    """:func:`~conveyor.core.urls.mask_url`, and the user name masked too where it equals the
    password of any of the URL's endpoints (``guest:guest``): printing it would print the
    password. (mask_url alone reads ``;``-joined alternates with a raw ``;`` in a password
    as one URL, and would show the user name of the first one.)"""
    masked = mask_url(url)
    try:
        endpoints = parse_amqp_url(url)[0] if url else []
    except ConveyorError:
        return masked
    for endpoint in endpoints:
        if endpoint.username and endpoint.username == endpoint.password:
            user = quote(endpoint.username, safe="")
            masked = masked.replace(f"//{user}:***@", "//***:***@")
            masked = masked.replace(f"//{endpoint.username}:***@", "//***:***@")
    return masked


def _ssl_context(options: AMQPConnectionOptions) -> ssl.SSLContext:
    if options.ssl_context is not None:
        context: ssl.SSLContext = options.ssl_context
        return context
    reqs = _cert_reqs(options.ssl_cert_reqs)
    context = ssl.create_default_context(cafile=options.ssl_ca_certs)
    context.check_hostname = bool(options.ssl_check_hostname) and reqs == ssl.CERT_REQUIRED
    context.verify_mode = reqs if reqs is not None else ssl.CERT_REQUIRED
    if options.ssl_certfile:
        context.load_cert_chain(options.ssl_certfile, options.ssl_keyfile)
    return context


def connection_parameters(
    endpoint: AMQPEndpoint, options: AMQPConnectionOptions, *, name: str
) -> pika.ConnectionParameters:
    """pika parameters for one endpoint (one attempt each: the link does the retrying)."""
    ssl_options = None
    if endpoint.tls:
        ssl_options = pika.SSLOptions(_ssl_context(options), server_hostname=endpoint.host)
    return pika.ConnectionParameters(
        host=endpoint.host,
        port=endpoint.port,
        virtual_host=endpoint.vhost,
        credentials=pika.PlainCredentials(
            endpoint.username, endpoint.password, erase_on_connect=False
        ),
        heartbeat=round(options.heartbeat),
        connection_attempts=1,
        retry_delay=0,
        socket_timeout=options.connect_timeout,
        stack_timeout=options.connect_timeout,
        blocked_connection_timeout=None,
        ssl_options=ssl_options,
        client_properties={"connection_name": options.connection_name or name},
    )

"""Redis URLs and connections, shared by the Redis broker and result backend: the four URL
schemes (``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://``), the connection
options both take and ``connect`` (redis-py's client, its retry policy, TLS and Sentinel).
The URL syntax and options are documented in :mod:`conveyor.transports.redis`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.exceptions as rexc
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from conveyor.core.errors import ConfigurationError, InvalidURL
from conveyor.core.urls import ParsedURL, mask_url, parse_url, scheme_of, split_alternates

__all__ = ["RedisConnectionOptions", "RedisTarget", "connect", "parse_redis_url"]

_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


@dataclass(frozen=True)
class RedisConnectionOptions:
    """Connection settings shared by the Redis broker and result backend (seconds as float).

    Attributes:
        socket_timeout: longest wait for one command's reply (None: forever; not advised).
        socket_connect_timeout: longest wait to establish a connection.
        socket_keepalive: TCP keepalive on every connection.
        health_check_interval: a connection idle this long is PINGed before reuse (0: off).
        max_connections: pool size limit (None: unbounded).
        max_retries: retries (with jittered exponential backoff) of a command that hit a
            connection error or timeout, a READONLY reply after a failover, or a server that
            is loading its data; each retry reconnects.
        retry_backoff_cap: the longest backoff between two retries.
        client_name: ``CLIENT SETNAME`` of every connection.
        master_name: Sentinel: the monitored master's name (required for ``sentinel://``).
        sentinel_kwargs: Sentinel: connection keywords for the sentinels themselves.
        sentinel_username, sentinel_password: Sentinel: credentials for the sentinels.
        ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname: TLS
            settings for ``rediss://`` (Celery's ``ssl_*`` URL keys).
    """

    socket_timeout: float | None = 30.0
    socket_connect_timeout: float | None = 5.0
    socket_keepalive: bool = True
    health_check_interval: float = 25.0
    max_connections: int | None = None
    max_retries: int = 3
    retry_backoff_cap: float = 1.0
    client_name: str | None = None
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] | None = field(default=None, repr=False)  # a password
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl_cert_reqs: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool | None = None

    def __post_init__(self) -> None:
        for name in ("socket_timeout", "socket_connect_timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a positive number of seconds or None")
        if self.health_check_interval < 0 or self.retry_backoff_cap < 0:
            raise ConfigurationError("health_check_interval/retry_backoff_cap must be >= 0")
        if self.max_retries < 0:
            raise ConfigurationError("max_retries must be >= 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigurationError("max_connections must be >= 1 or None")
        if self.sentinel_kwargs is not None and not isinstance(self.sentinel_kwargs, dict):
            raise ConfigurationError("sentinel_kwargs must be a dict (a keyword option only)")
        if self.ssl_cert_reqs is not None:
            _cert_reqs(self.ssl_cert_reqs)


def _cert_reqs(value: str) -> str:
    text = value.strip().lower()
    text = text.removeprefix("cert_")
    if text not in ("required", "optional", "none"):
        raise ConfigurationError(
            f"ssl_cert_reqs must be required, optional or none (or CERT_REQUIRED, ...): {value!r}"
        )
    return text


@dataclass(frozen=True)
class RedisTarget:
    """Where a URL points, without secrets in ``repr``."""

    scheme: str
    db: int
    kwargs: Mapping[str, Any] = field(repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()


def _db_from_path(path: str, url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidURL(f"bad database {text!r} in {mask_url(url)!r}: a number, e.g. /0")
    return int(text)


def parse_redis_url(url: str) -> tuple[RedisTarget, dict[str, str]]:
    """Parse any of the four schemes; return the target and the query (option) keys.

    Raises:
        InvalidURL: malformed URL, bad database number, several hosts outside Sentinel.
    """
    scheme = scheme_of(url)
    if scheme not in _SCHEMES:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a Redis URL (redis://, rediss://, redis+socket://, "
            "sentinel://)"
        )
    if scheme == "sentinel":
        parts = [
            parse_url(p, default_host="localhost", default_port=26379)
            for p in split_alternates(url)
        ]
        hosts: list[tuple[str, int]] = []
        for part in parts:
            if part.scheme != "sentinel":
                raise InvalidURL(f"mixed schemes in {mask_url(url)!r}")
            hosts.extend((h, p or 26379) for h, p in part.hosts)
        first = parts[0]
        query: dict[str, str] = {}
        for part in parts:
            query.update(part.query)
        auth = _credentials(next((p for p in parts if p.password is not None), first))
        db = _db_from_path(next((p.path for p in parts if p.path.strip("/")), ""), url)
        return RedisTarget("sentinel", db, auth, tuple(hosts)), query
    parsed = parse_url(url, default_host="localhost", default_port=6379)
    query = dict(parsed.query)
    kwargs: dict[str, Any] = _credentials(parsed)
    if scheme == "redis+socket":
        path = "/" + parsed.path.lstrip("/") if parsed.path else ""
        if parsed.hosts and parsed.hosts[0][0] not in ("", "localhost"):
            path = "/" + "/".join(filter(None, (parsed.hosts[0][0], parsed.path)))
        if not path.strip("/"):
            raise InvalidURL(f"{mask_url(url)!r} names no socket path")
        kwargs["unix_socket_path"] = path
        vhost = query.pop("virtual_host", "0") or "0"
        return RedisTarget(scheme, _db_from_path(vhost, url), kwargs), query
    if len(parsed.hosts) != 1:
        raise InvalidURL(f"{mask_url(url)!r}: one host per redis:// URL (use sentinel://)")
    host, port = parsed.hosts[0]
    kwargs["host"], kwargs["port"] = host, port or 6379
    return RedisTarget(scheme, _db_from_path(parsed.path, url), kwargs), query


def _credentials(parsed: ParsedURL) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if parsed.username:
        out["username"] = parsed.username
    if parsed.password is not None:
        out["password"] = parsed.password
    return out


def connect(target: RedisTarget, opts: RedisConnectionOptions, url: str) -> redis.Redis:
    """A redis-py client (with its own pool) for ``target``; connects lazily.

    Commands hitting connection errors, timeouts, READONLY (a demoted master) or LOADING are
    retried ``max_retries`` times with jittered exponential backoff, reconnecting each time;
    with Sentinel every reconnect asks the sentinels for the current master.

    Raises:
        ConfigurationError: TLS keys on a non-TLS URL, Sentinel without ``master_name``.
    """
    ssl_given = {k: getattr(opts, k) for k in _SSL_KEYS if getattr(opts, k) is not None}
    if ssl_given and target.scheme != "rediss":
        raise ConfigurationError(
            f"{', '.join(sorted(ssl_given))} given for {mask_url(url)!r}: TLS options need "
            "a rediss:// URL"
        )
    retry = Retry(
        ExponentialWithJitterBackoff(cap=opts.retry_backoff_cap, base=0.05),
        opts.max_retries,
        supported_errors=(
            rexc.ConnectionError,
            rexc.TimeoutError,
            TimeoutError,
            rexc.ReadOnlyError,
            rexc.BusyLoadingError,
        ),
    )
    kwargs: dict[str, Any] = dict(target.kwargs)
    kwargs.update(
        db=target.db,
        socket_timeout=opts.socket_timeout,
        socket_connect_timeout=opts.socket_connect_timeout,
        socket_keepalive=opts.socket_keepalive,
        health_check_interval=opts.health_check_interval,
        retry=retry,
        retry_on_error=[rexc.ReadOnlyError, rexc.BusyLoadingError],
        client_name=opts.client_name,
    )
    if opts.max_connections is not None:
        kwargs["max_connections"] = opts.max_connections
    if target.scheme == "rediss":
        kwargs["ssl"] = True
        kwargs["ssl_cert_reqs"] = _cert_reqs(opts.ssl_cert_reqs or "required")
        for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"):
            if getattr(opts, key) is not None:
                kwargs[key] = getattr(opts, key)
    if target.scheme == "sentinel":
        if not opts.master_name:
            raise ConfigurationError(
                f"{mask_url(url)!r}: sentinel:// needs the option master_name (Celery: "
                "broker_transport_options={'master_name': ...})"
            )
        from redis.sentinel import Sentinel

        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": opts.socket_connect_timeout,
            "socket_connect_timeout": opts.socket_connect_timeout,
        }
        if opts.sentinel_username:
            sentinel_kwargs["username"] = opts.sentinel_username
        if opts.sentinel_password is not None:
            sentinel_kwargs["password"] = opts.sentinel_password
        sentinel_kwargs.update(opts.sentinel_kwargs or {})
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            opts.master_name, **kwargs
        )
        return client
    return redis.Redis(**kwargs)

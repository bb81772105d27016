"""Redis client plumbing shared by the Redis broker (:mod:`conveyor.transports.redis`) and
result backend (:mod:`conveyor.backends.redis`). Private.

* :mod:`.connection`: URL parsing (:func:`parse_redis_url`), :class:`RedisConnectionOptions`
  and :func:`connect` (redis-py's client with its retry policy, TLS and Sentinel);
* :mod:`.errors`: error translation, :func:`translate_error` and :func:`translating`;
* :mod:`.held`: hot-path commands on a connection held per thread (:class:`HeldConnections`),
  Lua scripts known by SHA1 (:class:`Script`) and their source, every Redis Lua file of
  conveyor, in ``lua/`` (:func:`lua_source`).
"""

from __future__ import annotations

from conveyor._drivers.redis.connection import (
    RedisConnectionOptions,
    RedisTarget,
    connect,
    parse_redis_url,
)
from conveyor._drivers.redis.errors import (
    TRANSIENT_REPLIES,
    reply_code,
    translate_error,
    translating,
)
from conveyor._drivers.redis.held import HeldConnections, Script, lua_source

__all__ = [
    "TRANSIENT_REPLIES",
    "HeldConnections",
    "RedisConnectionOptions",
    "RedisTarget",
    "Script",
    "connect",
    "lua_source",
    "parse_redis_url",
    "reply_code",
    "translate_error",
    "translating",
]

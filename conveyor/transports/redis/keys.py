"""The Redis broker's keys and scripts: kombu's ready lists and binding sets, conveyor's own
bookkeeping keys (``conveyor:{<queue>}:...``) and the Lua scripts that work on them (their
source is in :mod:`conveyor._drivers.redis`'s ``lua/``). The layout is described in
:mod:`conveyor.transports.redis`."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from conveyor._drivers.redis import Script, lua_source

__all__ = ["Keys", "Scripts"]


class Keys:
    """Key names for one prefix / separator / step configuration."""

    def __init__(self, prefix: str, sep: str, steps: Sequence[int]) -> None:
        self.prefix = prefix
        self.sep = sep
        self.steps = tuple(steps)

    def ready(self, queue: str) -> list[str]:
        """kombu's priority lists of ``queue``, in service order."""
        p = self.prefix
        return [f"{p}{queue}" if s == 0 else f"{p}{queue}{self.sep}{s}" for s in self.steps]

    def own(self, queue: str, kind: str) -> str:
        return f"{self.prefix}conveyor:{{{queue}}}:{kind}"

    def binding(self, queue: str) -> tuple[str, str]:
        """kombu's binding set key and member for the direct exchange named ``queue``."""
        return f"{self.prefix}_kombu.binding.{queue}", f"{queue}{self.sep}{self.sep}{queue}"


class Scripts:
    """The broker's Lua scripts (``common.lua`` + ``<name>.lua``), known by SHA1 (loaded again
    after NOSCRIPT, e.g. when a restarted server or a new master has an empty script cache)."""

    def __init__(self, client: redis.Redis) -> None:
        self.publish = Script(client, lua_source("common", "publish"))
        self.push = Script(client, lua_source("common", "push"))
        self.claim = Script(client, lua_source("common", "claim"))
        self.extend = Script(client, lua_source("common", "extend"))
        self.settle = Script(client, lua_source("common", "settle"))
        self.purge = Script(client, lua_source("common", "purge"))

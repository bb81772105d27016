"""Options of the Redis broker (:class:`RedisBrokerOptions`), documented in
:mod:`conveyor.transports.redis`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor._drivers.redis import RedisConnectionOptions
from conveyor.core.errors import ConfigurationError
from conveyor.transports.redis.envelope import KOMBU_MAX_PRIORITY

__all__ = ["RedisBrokerOptions"]


@dataclass(frozen=True)
class RedisBrokerOptions(RedisConnectionOptions):
    """Options of :class:`RedisBroker` (seconds as float); connection settings inherited.

    Attributes:
        lease_seconds: how long a delivery stays held without ``extend`` (> 0).
        poll_interval: the longest a blocked ``receive`` sleeps between two claims (> 0).
        reclaim_batch: most expired leases one claim restores per queue.
        promote_batch: most due delayed messages one claim promotes per queue.
        global_keyprefix: kombu's ``global_keyprefix``: prepended to every key, never to
            values.
        priority_steps: kombu's ``priority_steps`` (ascending, starting at 0, within 0-9).
        sep: kombu's ``sep`` between a queue name and its priority step.
    """

    lease_seconds: float = 60.0
    poll_interval: float = 0.1
    reclaim_batch: int = 100
    promote_batch: int = 500
    global_keyprefix: str = ""
    priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    sep: str = "\x06\x16"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lease_seconds", "poll_interval"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")
        if self.reclaim_batch < 1 or self.promote_batch < 1:
            raise ConfigurationError("reclaim_batch and promote_batch must be >= 1")
        steps = tuple(int(s) for s in self.priority_steps)
        if (
            not steps
            or steps[0] != 0
            or list(steps) != sorted(set(steps))
            or steps[-1] > KOMBU_MAX_PRIORITY
        ):
            raise ConfigurationError(
                f"priority_steps must be ascending, start at 0 and stay within 0-9: {steps!r}"
            )
        object.__setattr__(self, "priority_steps", steps)
        if not self.sep:
            raise ConfigurationError("sep must not be empty")

"""Per-worker task rate limits: Celery's ``rate_limit`` strings and the limiter that spaces
task starts (used by :mod:`conveyor.runtime.delivery`).

Thread-safety: :func:`parse_rate` is pure; one :class:`RateLimiter` is shared by the slot
threads that run its task.
"""

from __future__ import annotations

import threading
import time

from conveyor.core.errors import ConfigurationError

__all__ = ["RateLimiter", "parse_rate"]


def parse_rate(rate: str | float | int | None) -> float | None:
    """Tasks per second from Celery's ``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number."""
    if rate is None or rate == "":
        return None
    if isinstance(rate, (int, float)):
        per_second = float(rate)
    else:
        count, _, unit = str(rate).partition("/")
        divisor = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip().lower())
        if divisor is None:
            raise ConfigurationError(f"bad rate_limit {rate!r}: use N/s, N/m or N/h")
        per_second = float(count) / divisor
    return per_second if per_second > 0 else None


class RateLimiter:
    """Spaces starts of one task evenly: at most ``per_second`` starts per second per worker."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, stopping: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            stopping.wait(start - now)

"""The app the fault tests' worker subprocesses run (``-A fault_app``).

Configured by environment variables (set by ``faultsupport.worker_env``):
``FAULT_BROKER`` and ``FAULT_BACKEND`` (URLs), ``FAULT_MARKERS`` (a folder: every execution
appends the task id to ``<folder>/<pid>.log``, to count executions outside the system under
test), ``FAULT_LEASE`` (worker_lease_seconds, default 2), ``FAULT_PREFETCH``
(worker_prefetch_multiplier, default 4).
"""

from __future__ import annotations

import os
import time
from typing import Any

from conveyor import App

app = App(
    "faults",
    broker=os.environ.get("FAULT_BROKER"),
    backend=os.environ.get("FAULT_BACKEND"),
    worker_lease_seconds=float(os.environ.get("FAULT_LEASE", "2")),
    worker_prefetch_multiplier=int(os.environ.get("FAULT_PREFETCH", "4")),
    result_expires=float(os.environ.get("FAULT_RESULT_EXPIRES", "3600")),
)

_fd: int | None = None
_fd_pid = -1


def _marker_fd() -> int:
    global _fd, _fd_pid
    if _fd is None or _fd_pid != os.getpid():  # one file per process (prefork children too)
        folder = os.environ["FAULT_MARKERS"]
        _fd = os.open(f"{folder}/{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = os.getpid()
    return _fd


@app.task(name="faults.work", bind=True)
def work(self: Any, n: int, seconds: float = 0.0) -> int:
    """Record this execution (one atomic append), then work for ``seconds``."""
    os.write(_marker_fd(), f"{self.request.id}\n".encode())
    if seconds:
        time.sleep(seconds)  # the workload itself
    return n

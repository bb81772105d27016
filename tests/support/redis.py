"""Redis servers for the tests: where they are, and skip-or-fail when they are not there.

``CONVEYOR_TEST_REDIS_URL`` points the tests at a server (default
``redis://127.0.0.1:6379/9``: database 9 of the machine's Redis, so tests never touch db 0).
Every test uses its own queue and key names (``unique_name``), so files run in parallel under
pytest-xdist against that one database. A missing server skips locally and fails under CI
(:func:`conveyor.testing.support.service_unavailable`).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from conveyor.testing.support import service_unavailable
from support.processes import terminating as terminating  # re-exported

REDIS_URL = os.environ.get("CONVEYOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def require_redis(url: str = REDIS_URL) -> redis.Redis:
    """A client on ``url`` after a successful PING; skip (locally) or fail (CI) otherwise."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        service_unavailable("Redis", url, exc)
    return client


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port_url(scheme: str = "redis") -> str:
    """A URL of ``scheme`` on a loopback port nothing listens on."""
    return f"{scheme}://127.0.0.1:{free_port()}/0"


def delete_keys(client: redis.Redis, *patterns: str) -> None:
    """Delete every key matching any of ``patterns`` (SCAN, never KEYS)."""
    for pattern in patterns:
        batch = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(batch), 500):
            client.delete(*batch[start : start + 500])


def vm_rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB, from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def redis_server_binary(name: str = "redis-server") -> str | None:
    """Path of ``name`` (redis-server, redis-sentinel) or None."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/sbin"]:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_thread_waves(target: Callable[[], object], waves: int, per_wave: int) -> None:
    """Run ``target`` in ``waves`` waves of ``per_wave`` short-lived threads (a thread per
    request), dropping each wave's threads and collecting garbage after it."""
    for _ in range(waves):
        wave = [threading.Thread(target=target) for _ in range(per_wave)]
        for thread in wave:
            thread.start()
        for thread in wave:
            thread.join()
        del wave, thread
        gc.collect()

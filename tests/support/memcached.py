"""Where the memcached tests find a server.

``CONVEYOR_TEST_MEMCACHED_URL`` (default ``cache+memcached://127.0.0.1:11211/``), started by
``scripts/services.sh ensure memcached`` (Debian's package). A server that does not answer
is :func:`service_unavailable`: skipped locally, a failure under ``CI=true`` /
``CONVEYOR_REQUIRE_SERVICES=1``. Tests use unique ids and keys, so runs and xdist workers
share the server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from conveyor.backends.memcached import _parse_servers
from conveyor.testing.support import requirement_missing, service_unavailable

__all__ = [
    "MEMCACHED_URL",
    "extra_memcached",
    "free_port",
    "memcached_url",
    "memcached_version",
    "raw_command",
]

MEMCACHED_URL = os.environ.get("CONVEYOR_TEST_MEMCACHED_URL", "cache+memcached://127.0.0.1:11211/")


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(version of the first server, error) once per process."""
    servers, _ = _parse_servers(MEMCACHED_URL)
    versions: list[str] = []
    for host, port in servers:
        try:
            with socket.create_connection((host, port), timeout=2.0) as sock:
                sock.sendall(b"version\r\n")
                reply = sock.recv(128).decode("ascii", "replace").strip()
        except OSError as exc:
            return None, f"{host}:{port}: {exc}"
        if not reply.startswith("VERSION "):
            return None, f"{host}:{port} answered {reply!r}"
        versions.append(reply.split(" ", 1)[1])
    return versions[0], ""


def memcached_version() -> str | None:
    return _probe()[0]


@pytest.fixture(scope="session")
def memcached_url() -> str:
    """The server's URL; skip (locally) or fail (CI) when it does not answer."""
    version, error = _probe()
    if version is None:
        service_unavailable("memcached", MEMCACHED_URL, error)
    return MEMCACHED_URL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raw_command(host: str, port: int, command: str) -> str:
    """Send one text-protocol command and return the first reply line (no trailing CRLF)."""
    with socket.create_connection((host, port), timeout=2.0) as sock:
        sock.sendall(command.encode("ascii") + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.decode("utf-8", "replace").split("\r\n", 1)[0]


@pytest.fixture(scope="session")
def extra_memcached(memcached_url: str) -> Iterator[tuple[str, int]]:
    """A second memcached of our own on a free loopback port (for multi-server tests)."""
    binary = shutil.which("memcached")
    if binary is None:
        requirement_missing(
            "no memcached binary to start a second server (apt-get install memcached)"
        )
    port = free_port()
    argv = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "32"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if raw_command("127.0.0.1", port, "version").startswith("VERSION"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                requirement_missing(f"second memcached did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

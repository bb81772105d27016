"""Where the memcached tests find a server.

``CONVEYOR_TEST_MEMCACHED_URL`` (default ``cache+memcached://127.0.0.1:11211/``), started by
``scripts/services.sh ensure memcached`` (Debian's package). A server that does not answer
is :func:`service_unavailable`: skipped locally, a failure under ``CI=true`` /
``CONVEYOR_REQUIRE_SERVICES=1``. Tests use unique ids and keys, so runs and xdist workers
share the server.
"""

from __future__ import annotations

import functools
import os
import socket

import pytest

from conveyor.backends.memcached import _parse_servers
from conveyor.testing.support import service_unavailable

__all__ = ["MEMCACHED_URL", "memcached_url", "memcached_version"]

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

"""Where the MongoDB tests find a server, and what that server is.

* ``CONVEYOR_TEST_MONGODB_URL`` (default ``mongodb://127.0.0.1:27017/conveyor_test``): the
  shared server, started by ``scripts/services.sh ensure mongodb`` (SecantusDB, a
  MongoDB-protocol test server, see ``docs/stores/mongodb.md``) or a real MongoDB. A
  server that does not answer is :func:`service_unavailable`: skipped locally, a failure
  under ``CI=true`` / ``CONVEYOR_REQUIRE_SERVICES=1``.
* :func:`private_secantus`: a SecantusDB of our own on a free port with a 1 s TTL sweep, for
  the one test that waits for the TTL monitor to delete documents (the shared server sweeps
  every 60 s, like mongod). It runs from SecantusDB's own virtualenv
  (``CONVEYOR_MONGO_TEST_VENV``, default ``/opt/mongo-test``) and is skipped when that is not
  installed: it is a test-time tool, never a dependency of conveyor.

Every test uses unique queue names, task ids and keys, so runs and xdist workers can share
one database.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from conveyor.core.urls import mask_url
from conveyor.testing.support import requirement_missing, service_unavailable

__all__ = [
    "MONGODB_URL",
    "free_port",
    "is_real_mongodb",
    "mongodb_url",
    "private_secantus",
    "server_description",
    "unreachable_mongodb_url",
]

MONGODB_URL = os.environ.get("CONVEYOR_TEST_MONGODB_URL", "mongodb://127.0.0.1:27017/conveyor_test")
_MONGO_VENV = Path(os.environ.get("CONVEYOR_MONGO_TEST_VENV", "/opt/mongo-test"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unreachable_mongodb_url() -> str:
    """A MongoDB URL on a closed loopback port that gives up after one second."""
    return f"mongodb://127.0.0.1:{free_port()}/conveyor_test?server_selection_timeout=1"


def _probe(url: str) -> dict[str, Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(
        url, serverSelectionTimeoutMS=3000, connectTimeoutMS=3000
    )
    try:
        info: dict[str, Any] = client.server_info()
        return info
    finally:
        client.close()


def server_description(info: dict[str, Any]) -> str:
    """``SecantusDB 0.7.0b3 (reports MongoDB 8.2.11)`` or ``MongoDB 7.0.5``."""
    version = str(info.get("version", "?"))
    for key, name in (("secantusVersion", "SecantusDB"), ("ferretdb", "FerretDB")):
        if key in info:
            detail = info[key]
            own = detail.get("version", "?") if isinstance(detail, dict) else detail
            return f"{name} {own} (reports MongoDB {version})"
    return f"MongoDB {version}"


@functools.cache
def _shared_server() -> tuple[str | None, str]:
    """(description, error): probe the shared server once per process."""
    try:
        return server_description(_probe(MONGODB_URL)), ""
    except PyMongoError as exc:
        return None, str(exc).splitlines()[0][:300]


def is_real_mongodb() -> bool:
    """True when the shared server is a MongoDB (not a MongoDB-protocol test server).

    Test servers (SecantusDB: tens of claims per second) get the suites' "slow server" knobs;
    a real MongoDB gets the full-size tests. Unreachable counts as a test server (the tests
    then skip or fail on the fixture anyway).
    """
    description, _ = _shared_server()
    return description is not None and description.startswith("MongoDB ")


@pytest.fixture(scope="session")
def mongodb_url(request: pytest.FixtureRequest) -> str:
    """The shared server's URL; skip (locally) or fail (CI) when it does not answer."""
    description, error = _shared_server()
    if description is None:
        service_unavailable("mongodb", MONGODB_URL, error)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not getattr(request.config, "_conveyor_mongo_said", False):
        request.config._conveyor_mongo_said = True  # type: ignore[attr-defined]
        reporter.write_line(f"mongodb tests use {description} at {mask_url(MONGODB_URL)}")
    return MONGODB_URL


_SERVER_SCRIPT = """
import sys, time
from secantus.server import SecantusDBServer
server = SecantusDBServer(host="127.0.0.1", port=int(sys.argv[1]), storage_path=":memory:",
                          ttl_sweep_seconds=1.0)
server.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # runs until the test process closes our stdin (or dies)
finally:
    server.stop()
"""


@pytest.fixture(scope="session")
def private_secantus() -> Iterator[str]:
    """A private SecantusDB with a 1 s TTL sweep; yields its URL. Skips when not installed."""
    python = _MONGO_VENV / "bin" / "python"
    if not python.exists():
        requirement_missing(
            f"SecantusDB is not installed in {_MONGO_VENV} (CONVEYOR_MONGO_TEST_VENV)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [str(python), "-c", _SERVER_SCRIPT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until ready, or "" if it died
        if line.strip() != "ready":
            requirement_missing(f"private SecantusDB did not start (exit code {proc.poll()})")
        url = f"mongodb://127.0.0.1:{port}/conveyor_ttl"
        deadline = time.monotonic() + 30
        while True:
            try:
                _probe(url)
                break
            except PyMongoError:
                if time.monotonic() > deadline:
                    raise
        yield url
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


if __name__ == "__main__":  # pragma: no cover - `python tests/support/mongo.py`
    description, error = _shared_server()
    print(description or f"not reachable: {error}")
    sys.exit(0 if description else 1)

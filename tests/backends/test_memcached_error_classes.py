"""The memcached result backend tells a value over the item size limit (not transient:
``EncodeError``) from a server out of memory (transient: ``OperationalError``) by asking
the server its limit (``stats settings``), never by reading the error reply; and an error
about a URL never quotes its credentials (issue 13, items 8 and 10). A private memcached
with a 256 KiB item limit, 2 MiB of memory and no eviction (``-M``) shows both replies."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from support.memcached import free_port, memcached_url, raw_command  # noqa: F401 - fixture

from conveyor.backends.memcached import MemcachedResultBackend
from conveyor.core.errors import (
    ConfigurationError,
    EncodeError,
    InvalidURL,
    OperationalError,
)
from conveyor.core.types import GroupRecord, ResultRecord, State
from conveyor.testing.support import requirement_missing, unique_name

LIMIT = 256 * 1024


@pytest.fixture
def small_server(memcached_url: str) -> Iterator[str]:  # noqa: F811
    binary = shutil.which("memcached")
    if binary is None:
        requirement_missing("no memcached binary to start a private server")
    port = free_port()
    argv = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "2", "-M"]
    argv += ["-I", "256k", "-o", "slab_chunk_max=131072"]
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
                requirement_missing(f"private memcached did not start ({proc.poll()})")
            time.sleep(0.05)
        yield f"cache+memcached://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def _record(size: int) -> ResultRecord:
    return ResultRecord(
        unique_name("big"), State.SUCCESS, "x" * size, date_done=datetime.now(timezone.utc)
    )


def test_a_value_over_the_item_size_limit_is_an_encode_error(small_server: str) -> None:
    backend = MemcachedResultBackend.from_url(small_server)
    try:
        with pytest.raises(EncodeError, match=f"item size limit \\({LIMIT} bytes"):
            backend.store(_record(LIMIT + 1000))
        members = [f"member-{i:06d}-{'x' * 90}" for i in range(3000)]  # about 300 KB
        with pytest.raises(EncodeError):
            backend.store_group(GroupRecord(unique_name("g"), tuple(members)))
        backend.store(_record(1000))  # the control: a small value is stored
    finally:
        backend.close()


def test_a_server_out_of_memory_is_transient(small_server: str) -> None:
    backend = MemcachedResultBackend.from_url(small_server)
    try:

        def fill() -> None:
            for _ in range(100):  # 200 KB each into 2 MiB without eviction
                backend.store(_record(200_000))

        with pytest.raises(OperationalError) as info:
            fill()
        assert not isinstance(info.value, EncodeError | ConfigurationError)
    finally:
        backend.close()


@pytest.mark.parametrize(
    "url",
    [
        "cache+memcached://us:QZsecret@127.0.0.1:11211/db/",
        "cache+memcached://127.0.0.1:11211;us:QZsecret@h2/x/",
    ],
)
def test_a_url_with_a_path_is_refused_without_quoting_its_credentials(url: str) -> None:
    with pytest.raises((InvalidURL, ConfigurationError)) as info:
        MemcachedResultBackend.from_url(url)
    assert "QZ" not in str(info.value)

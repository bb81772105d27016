"""Decompression bombs through a real worker process (issue 13, class 7).

A CLI worker (``conveyor -A hostile_support worker``, threads pool, one slot) on Redis gets,
between good messages, one bomb per installed codec: zlib (256 MiB of zeros in ~260 KB),
bzip2 (16 concatenated streams: 1 GiB in ~1.3 KB), lzma (4 concatenated xz streams: 256 MiB
in ~40 KB), an ``.lzma`` stream whose header asks for a 4 GiB dictionary, and zstd/brotli
when installed. Each must be dead-lettered without running, the good messages must all run
once, and the worker's peak RSS (``VmHWM`` in ``/proc/<pid>/status``) may grow by no more
than the decompression limit plus a margin for the decoder's buffers (before issue 13 a
1.6 KB brotli message took a worker to 2 GiB).

The limit the worker applies is the configured one (``worker_max_message_size``), and the
``accept_compression`` setting refuses compressed messages before a byte is decoded: both
checked on the memory broker.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import json
import lzma
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hostile_support import (
    CliWorker,
    Runs,
    celery_envelope,
    cleanup,
    figures,
    hostile_app,
    peak_rss_kib,
    place,
    running,
    settled,
)

from conveyor.core.compression import DEFAULT_MAX_SIZE, is_available
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MIB = 1 << 20
#: What the decoder may hold on top of its output (chunk lists, the joined copy, JSON).
MARGIN = 96 * MIB


def _zeros_stream(compressor: Any, total: int) -> bytes:
    chunk = b"\0" * (4 * MIB)
    parts = [compressor.compress(chunk) for _ in range(total // len(chunk))]
    return b"".join(parts) + compressor.flush()


@functools.cache
def bombs() -> dict[str, tuple[str, bytes]]:
    """codec -> (compression header, body), built once per process."""
    made: dict[str, tuple[str, bytes]] = {
        "zlib": ("application/x-gzip", _zeros_stream(zlib.compressobj(9), 256 * MIB)),
        "bzip2": ("application/x-bz2", bz2.compress(b"\0" * (64 * MIB), 9) * 16),
        "lzma": ("application/x-lzma", _zeros_stream(lzma.LZMACompressor(preset=1), 64 * MIB) * 4),
    }
    # An .lzma ("alone") stream declaring a 4 GiB dictionary and an unknown size.
    alone = lzma.compress(b"\0" * MIB, format=lzma.FORMAT_ALONE)
    made["lzma-4gib-dictionary"] = (
        "application/x-lzma",
        alone[:1] + struct.pack("<I", 0xFFFFFFFF) + b"\xff" * 8 + alone[13:],
    )
    if is_available("zstd"):
        import zstandard

        made["zstd"] = (
            "application/zstd",
            zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (256 * MIB)),
        )
    if is_available("brotli"):
        import brotli

        made["brotli"] = ("application/x-brotli", brotli.compress(b"\0" * (256 * MIB)))
    return made


def _bomb(codec: str) -> Any:
    header, body = bombs()[codec]
    envelope = celery_envelope("h.count", unique_name(f"bomb-{codec}"))
    return dataclasses.replace(
        envelope, body=body, headers={**envelope.headers, "compression": header}
    )


def test_bombs_of_every_installed_codec_are_dead_lettered_and_the_worker_stays_small(
    tmp_path: Path,
) -> None:
    where = place("redis", tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("bombs")
    client, tasks = hostile_app(where, runs, task_default_queue=queue)
    workers = CliWorker(where, runs, tmp_path)
    codecs = list(bombs())
    started = time.monotonic()
    try:
        proc = workers.start(queue=queue, pool="threads", concurrency=1)
        workers.wait_ready(proc)
        # warm: the first task imports and allocates what every later one reuses
        assert tasks["count"].apply_async((0,)).get(timeout=60) == 0
        before = peak_rss_kib(proc.pid)
        good = [tasks["count"].apply_async((1,))]
        sent = {}
        for codec in codecs:
            envelope = _bomb(codec)
            client.broker.publish(envelope, queue=queue)
            sent[codec] = envelope.id
            good.append(tasks["count"].apply_async((len(good) + 1,)))
        assert [r.get(timeout=120) for r in good] == list(range(1, len(good) + 1))
        eventually(
            lambda: settled(client, queue) == (0, len(codecs)), 60,
            message="every bomb dead-lettered",
        )  # fmt: skip
        after = peak_rss_kib(proc.pid)
        assert proc.poll() is None
        grown = (after - before) * 1024
        log = workers.log()
    finally:
        workers.stop_all()
        client.close()
        cleanup(where, queue)
    assert all(runs.count(i) == 0 for i in sent.values())
    for codec in codecs:
        assert sent[codec] in log, f"no dead-letter line for the {codec} bomb"
    figures(
        "7-bombs", "redis", bad_inputs=len(codecs), codecs=codecs,
        inflated_mib=sum(256 if c != "bzip2" else 1024 for c in codecs if "dictionary" not in c),
        rss_before_mib=round(before / 1024, 1), rss_growth_mib=round(grown / MIB, 1),
        bound_mib=(DEFAULT_MAX_SIZE + MARGIN) // MIB, lost=0,
        seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    assert grown < DEFAULT_MAX_SIZE + MARGIN, f"worker grew {grown / MIB:.0f} MiB"


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_body_that_inflates_past_worker_max_message_size_is_dead_lettered(
    pool: str, tmp_path: Path
) -> None:
    where = place("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    app, tasks = hostile_app(where, runs, worker_max_message_size=MIB)
    try:
        # 8 MiB of JSON in ~8 KB: 8 times the configured limit, far under the built-in one
        inflated = app.send_task("h.count", ("x" * (8 * MIB),), compression="zlib")
        after = tasks["count"].apply_async((1,))
        with running(app, pool=pool, concurrency=1) as (worker, _):
            assert after.get(timeout=60) == 1
            eventually(lambda: sum(worker.stats.values()) >= 2, 30, message="both settled")
        assert runs.count(inflated.id) == 0, "an 8 MiB body ran under a 1 MiB limit"
        assert worker.stats["dead_lettered"] == 1
    finally:
        app.close()


def test_accept_compression_refuses_compressed_messages_before_decoding(tmp_path: Path) -> None:
    where = place("memory", tmp_path)
    runs = Runs(tmp_path / "runs")
    app, _tasks = hostile_app(where, runs, accept_compression=["zlib"])
    try:
        refused = app.send_task("h.count", (1,), compression="bzip2")
        allowed = app.send_task("h.count", (2,), compression="zlib")
        with running(app, concurrency=1) as (worker, _):
            assert allowed.get(timeout=60) == 2
            eventually(lambda: sum(worker.stats.values()) >= 2, 30, message="both settled")
        assert runs.count(refused.id) == 0, "a bzip2 message ran with accept_compression=zlib"
    finally:
        app.close()


def test_the_bombs_are_bombs() -> None:
    """Guard on the suite: each bomb inflates far past the limit (checked with the stdlib,
    bounded by reading only a little more than the limit)."""
    for codec, (_, body) in bombs().items():
        if codec == "zlib":
            d: Any = zlib.decompressobj()
            out = d.decompress(body, DEFAULT_MAX_SIZE + 1)
        elif codec in ("bzip2", "lzma"):
            d = bz2.BZ2Decompressor() if codec == "bzip2" else lzma.LZMADecompressor()
            out = d.decompress(body, DEFAULT_MAX_SIZE + 1)
            while len(out) <= DEFAULT_MAX_SIZE and not d.eof:
                out += d.decompress(b"", DEFAULT_MAX_SIZE + 1 - len(out))
            assert d.eof or len(out) > DEFAULT_MAX_SIZE
            if d.eof:  # one stream of several: the rest follow in unused_data
                assert len(d.unused_data) > 0
                continue
        else:
            continue
        assert len(out) > DEFAULT_MAX_SIZE, codec
        assert len(body) < 2 * MIB, codec
    assert json.dumps(sorted(bombs()))

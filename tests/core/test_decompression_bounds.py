"""Decompression is bounded for every codec, while decoding (issue 13, item 7).

Unit tests check the exact edges (limit, limit + 1, truncated, trailing data, concatenated
streams, the accept list); the bomb tests run the decoder in a fresh process on a payload
that inflates to 256 MiB with an 8 MiB limit and read that process's peak resident memory
(Linux ``VmHWM``, reset just before decoding): it must stay within the limit plus a small
constant. Before the fix a 3 KB brotli message took a process to 4 GiB.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import lzma
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor.core import compression
from conveyor.core.celery import (
    TaskMessage,
    build_envelope,
    decode_meta,
    encode_meta,
    parse_envelope,
)
from conveyor.core.compression import (
    BUILTIN_METHODS,
    STEP,
    compress,
    decompress,
    normalize_accept_compression,
)
from conveyor.core.errors import (
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    MissingDependency,
)
from conveyor.core.types import ResultRecord, State
from conveyor.runtime.config import DEFAULTS

ZSTD = importlib.util.find_spec("zstandard") is not None
BROTLI = importlib.util.find_spec("brotli") is not None


def _codec(name: str) -> Any:
    """A pytest param for a codec, skipped (with the reason) where its package is missing."""
    if name == "zstd" and not ZSTD:
        return pytest.param(name, marks=pytest.mark.skip(reason="zstandard not installed"))
    if name == "brotli" and not BROTLI:
        return pytest.param(name, marks=pytest.mark.skip(reason="brotli not installed"))
    return name


CODECS = [_codec(name) for name in BUILTIN_METHODS]


# ------------------------------------------------------------------------------ the edges


@pytest.mark.parametrize("method", CODECS)
def test_output_of_exactly_the_limit_decodes_and_one_byte_more_is_refused(method: str) -> None:
    data = bytes(range(256)) * 40 + b"x" * 50_000
    packed, _ = compress(data, method)
    assert decompress(packed, method, max_size=len(data)) == data
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decompress(packed, method, max_size=len(data) - 1)
    assert decompress(packed, method, max_size=None) == data


@pytest.mark.parametrize("method", CODECS)
def test_a_truncated_payload_is_a_decode_error(method: str) -> None:
    packed, _ = compress(b"conveyor " * 10_000, method)
    for cut in (1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(DecodeError):
            decompress(packed[:cut], method)


@pytest.mark.parametrize("method", CODECS)
def test_garbage_is_a_decode_error_never_another_exception(method: str) -> None:
    for junk in (b"", b"\x00", b"not compressed at all", bytes(range(256)) * 4):
        with pytest.raises(DecodeError):
            decompress(junk, method)


@pytest.mark.parametrize("method", ["bzip2", "lzma", _codec("zstd")])
def test_concatenated_streams_decode_whole_and_count_against_the_limit(method: str) -> None:
    one, _ = compress(b"a" * 1000, method)
    assert decompress(one * 3, method) == b"a" * 3000
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decompress(one * 3, method, max_size=2999)


@pytest.mark.parametrize("method", ["zlib", "bzip2", "lzma", _codec("zstd")])
def test_trailing_bytes_after_the_stream_are_ignored_as_by_the_stdlib(method: str) -> None:
    packed, _ = compress(b"payload", method)
    assert decompress(packed + b"trailing junk", method) == b"payload"


@pytest.mark.skipif(not ZSTD, reason="zstandard not installed")
def test_a_zstd_frame_declaring_more_than_the_limit_is_refused_before_decoding() -> None:
    import zstandard

    packed = zstandard.ZstdCompressor().compress(b"\0" * 1_000_000)
    assert zstandard.frame_content_size(packed) == 1_000_000
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decompress(packed, "zstd", max_size=999_999)


@pytest.mark.skipif(not ZSTD, reason="zstandard not installed")
def test_a_zstd_frame_without_a_declared_size_is_bounded_while_decoding() -> None:
    import zstandard

    writer = zstandard.ZstdCompressor().compressobj()  # streamed: no content size
    packed = writer.compress(b"\0" * 5_000_000) + writer.flush()
    assert zstandard.frame_content_size(packed) == -1
    assert decompress(packed, "zstd") == b"\0" * 5_000_000
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decompress(packed, "zstd", max_size=100_000)


@pytest.mark.skipif(not BROTLI, reason="brotli not installed")
def test_a_brotli_without_an_output_bound_is_refused_rather_than_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """brotli < 1.2 has no ``output_buffer_limit``: decoding with it could not be bounded."""
    import brotli

    class OldDecompressor:
        def process(self, data: bytes) -> bytes:  # brotli 1.1's signature
            raise AssertionError("must not be called without a bound")

    class OldBrotli:
        __version__ = "1.1.0"
        Decompressor = OldDecompressor
        compress = staticmethod(brotli.compress)

    monkeypatch.setattr(compression, "_brotli", lambda: OldBrotli)
    packed = brotli.compress(b"x")
    with pytest.raises(MissingDependency, match=r"brotli>=1\.2"):
        decompress(packed, "brotli")


# ------------------------------------------------------------------------ the accept list


def test_the_accept_compression_default_is_every_built_in_method() -> None:
    assert tuple(DEFAULTS["accept_compression"]) == BUILTIN_METHODS
    assert normalize_accept_compression(DEFAULTS["accept_compression"]) == set(BUILTIN_METHODS)


def test_accept_compression_takes_aliases_mime_types_and_comma_separated_text() -> None:
    assert normalize_accept_compression(["gzip", "application/x-bz2", "XZ"]) == {
        "zlib",
        "bzip2",
        "lzma",
    }
    assert normalize_accept_compression("zlib, zstandard") == {"zlib", "zstd"}
    assert normalize_accept_compression(None) == frozenset()
    assert normalize_accept_compression(()) == frozenset()
    with pytest.raises(ConfigurationError, match="Did you mean 'zlib'"):
        normalize_accept_compression(["zlb"])


@pytest.mark.parametrize("accept", [None, (), ["zlib"], frozenset({"zlib"})])
def test_a_method_not_accepted_is_refused_before_a_byte_is_decoded(accept: Any) -> None:
    bomb = b"this is not even bzip2"  # never looked at: refused by name first
    with pytest.raises(ContentDisallowed, match="accept_compression") as info:
        decompress(bomb, "application/x-bz2", accept=accept)
    assert info.value.what == "compression"
    packed, mime = compress(b"ok", "zlib")
    if accept:
        assert decompress(packed, mime, accept=accept) == b"ok"


def test_parse_envelope_and_decode_meta_take_the_accept_list_and_the_limit() -> None:
    msg = TaskMessage(task="t", id="i1", args=("x" * 5000,))
    env = build_envelope(msg, compression="lzma")
    assert parse_envelope(env, accept_compression=["lzma"]).args == msg.args
    with pytest.raises(ContentDisallowed):
        parse_envelope(env, accept_compression=["zlib"])
    with pytest.raises(ContentDisallowed):
        parse_envelope(env, accept_compression=None)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        parse_envelope(env, max_size=1000)
    raw = encode_meta(ResultRecord("i1", State.SUCCESS, "y" * 5000), compression="bzip2")
    assert decode_meta(raw, accept_compression=("bzip2",)).result == "y" * 5000
    with pytest.raises(ContentDisallowed):
        decode_meta(raw, accept_compression=("zlib",))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_meta(raw, max_size=1000)


# ---------------------------------------------------------------------- bombs, measured

EXPANDED = 256 * 1024 * 1024  # what each bomb inflates to
LIMIT = 8 * 1024 * 1024
#: The bound on the decoding process's peak growth: the limit, one step, and slack for the
#: interpreter and the codec's own state (zstd and brotli windows, lzma dictionary).
ALLOWED = LIMIT + STEP + 12 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
_ZEROS = b"\0" * _CHUNK


def _zlib_bomb() -> bytes:
    # Full flushes make every chunk compress to the same bytes: repeat them, then end the
    # stream with the right checksum, a valid 256 MiB zlib stream built in under a second.
    obj = zlib.compressobj(9)
    first = obj.compress(_ZEROS) + obj.flush(zlib.Z_FULL_FLUSH)
    again = obj.compress(_ZEROS) + obj.flush(zlib.Z_FULL_FLUSH)
    tail = obj.flush()[:-4]
    adler = 1
    for _ in range(EXPANDED // _CHUNK):
        adler = zlib.adler32(_ZEROS, adler)
    return first + again * (EXPANDED // _CHUNK - 1) + tail + struct.pack(">I", adler)


def _concatenated(one: bytes) -> bytes:
    return one * (EXPANDED // _CHUNK)  # bzip2, xz and zstd decoders read every stream


def _zstd_bomb() -> bytes:
    import zstandard

    writer = zstandard.ZstdCompressor(level=3).compressobj()  # no declared size
    return b"".join([*(writer.compress(_ZEROS) for _ in range(EXPANDED // _CHUNK)), writer.flush()])


def _brotli_bomb() -> bytes:
    import brotli

    writer = brotli.Compressor(quality=3)
    return b"".join([*(writer.process(_ZEROS) for _ in range(EXPANDED // _CHUNK)), writer.finish()])


BOMBS: dict[str, Callable[[], bytes]] = {
    "zlib": _zlib_bomb,
    "bzip2": lambda: _concatenated(bz2.compress(_ZEROS, 9)),
    "lzma": lambda: _concatenated(lzma.compress(_ZEROS, preset=0)),
    "zstd": _zstd_bomb,
    "brotli": _brotli_bomb,
}

_CHILD = r"""
import json, resource, sys
from conveyor.core.celery import parse_envelope
from conveyor.core.compression import compress, decompress, mime_type
from conveyor.core.errors import DecodeError
from conveyor.core.types import Envelope

method, path, limit, via = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
bomb = open(path, "rb").read()
small, _ = compress(b"warm-up " * 1000, method)
decompress(small, method)  # import the codec and size its state before measuring

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)

try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
    before, reset = status("VmRSS"), True
except OSError:
    before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
try:
    if via == "envelope":
        headers = {"task": "t", "id": "i", "compression": mime_type(method)}
        parse_envelope(Envelope(id="i", body=bomb, headers=headers), max_size=limit)
    else:
        decompress(bomb, method, max_size=limit)
    outcome = "decoded"
except DecodeError as exc:
    outcome = str(exc)
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "outcome": outcome, "size": len(bomb)}))
"""


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bombs")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("via", ["decompress", "envelope"])
@pytest.mark.parametrize("method", CODECS)
def test_a_bomb_never_makes_the_decoding_process_grow_past_the_limit(
    method: str, via: str, bomb_dir: Path
) -> None:
    path = bomb_dir / f"{method}.bomb"
    if not path.exists():
        path.write_bytes(BOMBS[method]())
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, method, str(path), str(LIMIT), via],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "exceeds the limit" in report["outcome"], report
    assert report["growth"] <= ALLOWED, (
        f"{method} bomb of {report['size']} bytes grew the process by "
        f"{report['growth'] / 2**20:.1f} MiB (allowed {ALLOWED / 2**20:.0f} MiB)"
    )

"""Compression: kombu names and MIME types, interop with kombu, bomb and corruption guards."""

from __future__ import annotations

import bz2
import contextlib
import lzma
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import compression as kombu_compression

from conveyor.core.compression import (
    DEFAULT_MAX_SIZE,
    compress,
    decompress,
    get_compressor,
    is_available,
    known_methods,
    mime_type,
)
from conveyor.core.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    MissingDependency,
)

PAYLOAD = b'[[2, 3], {"text": "\xc3\xa9"}, {"callbacks": null}]' * 50

STDLIB = [
    ("zlib", "application/x-gzip"),
    ("gzip", "application/x-gzip"),
    ("bzip2", "application/x-bz2"),
    ("bzip", "application/x-bz2"),
    ("lzma", "application/x-lzma"),
    ("xz", "application/x-lzma"),
]
ZSTD = [("zstd", "application/zstd"), ("zstandard", "application/zstd")]


@pytest.fixture
def zstandard_module() -> object:
    return pytest.importorskip("zstandard")


@pytest.mark.parametrize(("method", "mime"), STDLIB)
def test_round_trip_by_alias_and_by_mime(method: str, mime: str) -> None:
    packed, header = compress(PAYLOAD, method)
    assert header == mime
    assert len(packed) < len(PAYLOAD)
    assert decompress(packed, method) == PAYLOAD
    assert decompress(packed, mime) == PAYLOAD
    assert decompress(packed, mime.upper()) == PAYLOAD


@pytest.mark.parametrize(("method", "mime"), ZSTD)
def test_zstd_round_trip(zstandard_module: object, method: str, mime: str) -> None:
    packed, header = compress(PAYLOAD, method)
    assert header == mime
    assert decompress(packed, mime) == PAYLOAD


@pytest.mark.parametrize("mime", ["application/x-gzip", "application/x-bz2", "application/x-lzma"])
def test_kombu_reads_ours_and_we_read_kombus(mime: str) -> None:
    ours, header = compress(PAYLOAD, mime)
    assert kombu_compression.decompress(ours, header) == PAYLOAD
    theirs, their_header = kombu_compression.compress(PAYLOAD, mime)
    assert their_header == mime
    assert decompress(theirs, their_header) == PAYLOAD


def test_zlib_means_an_rfc1950_stream_not_a_gzip_file() -> None:
    packed, _ = compress(PAYLOAD, "gzip")
    assert packed[:1] == b"\x78"  # zlib header byte, not gzip's 1f 8b
    assert zlib.decompress(packed) == PAYLOAD


def test_lzma_writes_the_xz_container_kombu_writes() -> None:
    packed, _ = compress(PAYLOAD, "lzma")
    assert packed.startswith(b"\xfd7zXZ\x00")


def test_unknown_method_lists_known_ones_and_suggests() -> None:
    with pytest.raises(ConfigurationError) as info:
        compress(PAYLOAD, "zlb")
    message = str(info.value)
    assert "Did you mean 'zlib'" in message
    for name in ("bzip2", "gzip", "lzma", "xz", "zlib", "zstd"):
        assert name in message
    with pytest.raises(ConfigurationError):
        decompress(PAYLOAD, "application/x-snappy")


def test_lookup_helpers() -> None:
    assert mime_type("gzip") == "application/x-gzip"
    assert get_compressor("application/x-bz2").name == "bzip2"
    assert "application/zstd" in known_methods()
    assert is_available("zlib")
    assert not is_available("snappy")


@pytest.mark.parametrize("method", ["zlib", "bzip2", "lzma"])
def test_corrupt_data_is_a_decode_error(method: str) -> None:
    with pytest.raises(DecodeError) as info:
        decompress(b"definitely not compressed", method)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("method", ["zlib", "bzip2", "lzma"])
def test_truncated_data_is_a_decode_error(method: str) -> None:
    packed, _ = compress(PAYLOAD, method)
    with pytest.raises(DecodeError, match="truncated"):
        decompress(packed[: len(packed) // 2], method)


def test_zstd_corrupt_and_truncated(zstandard_module: object) -> None:
    packed, _ = compress(PAYLOAD, "zstd")
    with pytest.raises(DecodeError):
        decompress(b"junkjunkjunk", "zstd")
    with pytest.raises(DecodeError):
        decompress(packed[:-4], "zstd")


@pytest.mark.parametrize("method", ["zlib", "bzip2", "lzma"])
def test_output_beyond_max_size_is_refused(method: str) -> None:
    packed, _ = compress(b"\x00" * 100_000, method)
    assert decompress(packed, method, max_size=100_000) == b"\x00" * 100_000
    with pytest.raises(DecodeError, match="exceeds the limit of 99999 bytes"):
        decompress(packed, method, max_size=99_999)
    assert len(decompress(packed, method, max_size=None)) == 100_000


def test_a_zlib_bomb_stops_at_the_default_limit_without_inflating_it_all() -> None:
    # 128 MiB of zeros compress to ~130 KB; the guard must stop at 64 MiB + 1.
    comp = zlib.compressobj()
    chunk = b"\x00" * (1 << 20)
    bomb = b"".join(comp.compress(chunk) for _ in range(128)) + comp.flush()
    assert len(bomb) < 1 << 20
    with pytest.raises(DecodeError, match=str(DEFAULT_MAX_SIZE)):
        decompress(bomb, "zlib")


def test_zstd_declared_size_over_the_limit_is_refused_up_front(zstandard_module: object) -> None:
    packed, _ = compress(b"\x00" * 100_000, "zstd")
    with pytest.raises(DecodeError, match="exceeds"):
        decompress(packed, "zstd", max_size=1000)


def test_zstd_frame_without_declared_size_is_bounded(zstandard_module: object) -> None:
    compressor = zstandard_module.ZstdCompressor(write_content_size=False)  # type: ignore[attr-defined]
    packed = compressor.compress(b"\x00" * 100_000)
    assert decompress(packed, "zstd", max_size=100_000) == b"\x00" * 100_000
    assert decompress(packed, "zstd", max_size=None) == b"\x00" * 100_000
    with pytest.raises(DecodeError, match="exceeds"):
        decompress(packed, "zstd", max_size=50_000)


@pytest.mark.parametrize(("module", "method"), [(bz2, "bzip2"), (lzma, "lzma")])
def test_concatenated_streams_and_trailing_garbage_follow_the_stdlib(
    module: object, method: str
) -> None:
    one, _ = compress(b"first,", method)
    two, _ = compress(b"second", method)
    assert decompress(one + two, method) == b"first,second"
    assert decompress(one + b"garbage!", method) == module.decompress(one + b"garbage!")  # type: ignore[attr-defined]


def test_missing_zstandard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(MissingDependency) as info:
        compress(PAYLOAD, "zstd")
    assert info.value.extra == "zstd"
    assert "conveyor[zstd]" in str(info.value)
    assert not is_available("zstd")


def test_brotli_is_known_and_either_works_or_says_what_to_install() -> None:
    assert mime_type("brotli") == "application/x-brotli"
    try:
        import brotli  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="pip install brotli"):
            compress(PAYLOAD, "brotli")
        assert not is_available("brotli")
    else:  # pragma: no cover - brotli is not a declared extra
        packed, _ = compress(PAYLOAD, "brotli")
        assert decompress(packed, "application/x-brotli") == PAYLOAD


def test_compressing_a_non_buffer_is_an_encode_error() -> None:
    with pytest.raises(EncodeError):
        compress("text, not bytes", "zlib")  # type: ignore[arg-type]


def test_buffers_are_accepted_for_decompression() -> None:
    packed, _ = compress(PAYLOAD, "zlib")
    assert decompress(memoryview(packed), "zlib") == PAYLOAD
    assert decompress(bytearray(packed), "zlib") == PAYLOAD


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(["zlib", "bzip2", "lzma"]))
def test_round_trip_of_random_bytes(data: bytes, method: str) -> None:
    packed, mime = compress(data, method)
    assert decompress(packed, mime) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["zlib", "bzip2", "lzma", "zstd"]))
def test_random_input_only_raises_decode_error(data: bytes, method: str) -> None:
    if method == "zstd" and not is_available("zstd"):
        return
    with contextlib.suppress(DecodeError):
        decompress(data, method, max_size=10_000)

"""Body compression with kombu's names and Celery's ``compression`` header values.

=====================  ========================  =============================================
aliases                header value (MIME)       algorithm
=====================  ========================  =============================================
``zlib``, ``gzip``     ``application/x-gzip``    zlib stream (RFC 1950) -- *not* a gzip file,
                                                 despite the name; this is what kombu sends
``bzip2``, ``bzip``    ``application/x-bz2``     bzip2
``lzma``, ``xz``       ``application/x-lzma``    xz container (what ``lzma.compress`` writes)
``zstd``,              ``application/zstd``      zstd frame; needs ``conveyor[zstd]``
``zstandard``                                    (the ``zstandard`` package)
``brotli``             ``application/x-brotli``  brotli; needs the ``brotli`` package
=====================  ========================  =============================================

The serializer runs first and its ``content_type``/``content_encoding`` stay on the message;
the compressor's MIME type travels in the ``compression`` header. Decoders accept the alias or
the MIME type, like kombu.

Decompression bombs: :func:`decompress` stops at ``max_size`` bytes of output (default
:data:`DEFAULT_MAX_SIZE`, 64 MiB) and raises :class:`~conveyor.core.errors.DecodeError`. zlib,
bzip2 and lzma are decompressed incrementally with an output bound, so a bomb never gets
inflated past the limit; zstd frames are refused when their declared size exceeds the limit
and otherwise decoded with an output bound; brotli (no bounded API) is checked after decoding.

Errors: unknown method -> :class:`~conveyor.core.errors.ConfigurationError` listing the known
ones; known but not installed -> :class:`~conveyor.core.errors.MissingDependency`; corrupt,
truncated or oversized input -> ``DecodeError``; non-bytes input to :func:`compress` ->
:class:`~conveyor.core.errors.EncodeError`.

Thread-safety: all functions are pure; safe from any thread.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from conveyor.core.errors import ConfigurationError, ConveyorError, DecodeError, EncodeError
from conveyor.core.options import closest
from conveyor.core.serializers import missing_dependency

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Compressor",
    "compress",
    "decompress",
    "get_compressor",
    "is_available",
    "known_methods",
    "mime_type",
]

#: Default ceiling on decompressed size: 64 MiB (bytes).
DEFAULT_MAX_SIZE = 64 * 1024 * 1024


class _StreamDecompressor(Protocol):
    """The shape shared by ``bz2.BZ2Decompressor`` and ``lzma.LZMADecompressor``."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Compressor:
    """One compression method.

    Attributes:
        name: canonical alias (``"zlib"``).
        mime: the value of the ``compression`` header (``"application/x-gzip"``).
        aliases: every accepted name, ``name`` included.
        compress: bytes -> compressed bytes.
        decompress: ``(data, max_size or None) -> bytes``; raises ``DecodeError`` on corrupt,
            truncated or oversized input.
    """

    name: str
    mime: str
    aliases: tuple[str, ...]
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int | None], bytes]


def _too_big(limit: int) -> DecodeError:
    return DecodeError(f"decompressed payload exceeds the limit of {limit} bytes")


# -------------------------------------------------------------------------------------- zlib


def _zlib_decompress(data: bytes, limit: int | None) -> bytes:
    d = zlib.decompressobj()
    # max_length=0 means "unbounded" to zlib; limit + 1 lets us see that the limit was passed.
    out = d.decompress(data, 0 if limit is None else limit + 1)
    if limit is not None and len(out) > limit:
        raise _too_big(limit)
    if not d.eof:
        raise DecodeError("zlib stream is truncated (no end-of-stream marker)")
    # Trailing bytes after the stream are ignored, as zlib.decompress (and kombu) does.
    return out


# ---------------------------------------------------------------------------- bzip2 and lzma


def _multistream(
    factory: Callable[[], _StreamDecompressor], data: bytes, limit: int | None, what: str
) -> bytes:
    """Decode concatenated streams like ``bz2.decompress``/``lzma.decompress``, bounded."""
    chunks: list[bytes] = []
    total = 0
    while True:
        d = factory()
        room = -1 if limit is None else limit + 1 - total
        try:
            out = d.decompress(data, room)
        except Exception:
            # The stdlib functions ignore trailing data that is not another stream.
            if chunks:
                break
            raise
        total += len(out)
        chunks.append(out)
        if limit is not None and total > limit:
            raise _too_big(limit)
        if not d.eof:
            raise DecodeError(f"{what} data is truncated (no end-of-stream marker)")
        data = d.unused_data
        if not data:
            break
    return b"".join(chunks)


def _bz2_decompress(data: bytes, limit: int | None) -> bytes:
    return _multistream(bz2.BZ2Decompressor, data, limit, "bzip2")


def _lzma_decompress(data: bytes, limit: int | None) -> bytes:
    return _multistream(lzma.LZMADecompressor, data, limit, "lzma")


# -------------------------------------------------------------------------------------- zstd


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise missing_dependency("zstd compression", "zstd", "zstandard") from None
    return zstandard


def _zstd_compress(data: bytes) -> bytes:
    out: bytes = _zstandard().ZstdCompressor().compress(data)
    return out


#: Input fed per step when a zstd frame does not declare its size. A zstd block can expand
#: ~32000x (RLE), so small steps keep the overshoot past ``max_size`` to about 16 MiB.
_ZSTD_STEP = 512


def _zstd_decompress(data: bytes, limit: int | None) -> bytes:
    zstd = _zstandard()
    declared: int = zstd.frame_content_size(data)
    if declared >= 0:
        if limit is not None and declared > limit:
            # Refuse before zstandard allocates the declared size.
            raise _too_big(limit)
        # One frame, as kombu and Celery write; trailing data is ignored like zlib's.
        out: bytes = zstd.ZstdDecompressor().decompress(data)
        return out
    # No declared size (streamed writers): decode incrementally and watch the output.
    dobj = zstd.ZstdDecompressor().decompressobj()
    chunks: list[bytes] = []
    total = 0
    step = len(data) if limit is None else _ZSTD_STEP
    for start in range(0, len(data), max(step, 1)):
        piece: bytes = dobj.decompress(data[start : start + step])
        total += len(piece)
        chunks.append(piece)
        if limit is not None and total > limit:
            raise _too_big(limit)
        if dobj.eof:
            break
    if not dobj.eof:
        raise DecodeError("zstd frame is truncated")
    return b"".join(chunks)


# ------------------------------------------------------------------------------------ brotli


def _brotli() -> Any:
    try:
        # import_module: brotli ships no type stubs, and mypy must not need it installed.
        return importlib.import_module("brotli")
    except ImportError:
        raise missing_dependency("brotli compression", None, "brotli") from None


def _brotli_compress(data: bytes) -> bytes:
    out: bytes = _brotli().compress(data)
    return out


def _brotli_decompress(data: bytes, limit: int | None) -> bytes:
    out: bytes = _brotli().decompress(data)
    if limit is not None and len(out) > limit:
        raise _too_big(limit)
    return out


# ------------------------------------------------------------------------------------- table

_BUILTINS = (
    Compressor("zlib", "application/x-gzip", ("zlib", "gzip"), zlib.compress, _zlib_decompress),
    Compressor("bzip2", "application/x-bz2", ("bzip2", "bzip"), bz2.compress, _bz2_decompress),
    Compressor("lzma", "application/x-lzma", ("lzma", "xz"), lzma.compress, _lzma_decompress),
    Compressor("zstd", "application/zstd", ("zstd", "zstandard"), _zstd_compress, _zstd_decompress),
    Compressor("brotli", "application/x-brotli", ("brotli",), _brotli_compress, _brotli_decompress),
)

_LOOKUP: MappingProxyType[str, Compressor] = MappingProxyType(
    {key: c for c in _BUILTINS for key in (*c.aliases, c.mime)}
)
_OPTIONAL_IMPORTS: MappingProxyType[str, Callable[[], Any]] = MappingProxyType(
    {"zstd": _zstandard, "brotli": _brotli}
)


def known_methods() -> tuple[str, ...]:
    """Every alias and MIME type :func:`decompress` recognizes (installed or not)."""
    return tuple(sorted(_LOOKUP))


def get_compressor(method_or_mime: str) -> Compressor:
    """The :class:`Compressor` for an alias or MIME type (case-insensitive).

    Raises:
        ConfigurationError: unknown method; the message lists the known ones.
    """
    found = _LOOKUP.get(method_or_mime)
    if found is None and isinstance(method_or_mime, str):
        found = _LOOKUP.get(method_or_mime.strip().lower())
    if found is None:
        names = sorted(alias for c in _BUILTINS for alias in c.aliases)
        hint = closest(str(method_or_mime), list(_LOOKUP))
        did = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigurationError(
            f"unknown compression method {method_or_mime!r}.{did} "
            f"Known methods: {', '.join(names)}."
        )
    return found


def mime_type(method_or_mime: str) -> str:
    """The ``compression`` header value for a method, e.g. ``"zlib"`` -> ``application/x-gzip``.

    Raises:
        ConfigurationError: unknown method.
    """
    return get_compressor(method_or_mime).mime


def is_available(method_or_mime: str) -> bool:
    """True when the method is known and its package (if any) is importable."""
    try:
        comp = get_compressor(method_or_mime)
        check = _OPTIONAL_IMPORTS.get(comp.name)
        if check is not None:
            check()
    except ConfigurationError:
        return False
    return True


def compress(data: bytes, method: str) -> tuple[bytes, str]:
    """Compress ``data``.

    Args:
        data: the serialized body.
        method: an alias (``"zlib"``) or MIME type.

    Returns:
        ``(compressed, mime)``; put ``mime`` in the ``compression`` header.

    Raises:
        ConfigurationError: unknown method (``MissingDependency`` if not installed).
        EncodeError: ``data`` is not bytes-like.
    """
    comp = get_compressor(method)
    try:
        return comp.compress(data), comp.mime
    except ConveyorError:
        raise
    except Exception as exc:
        raise EncodeError(f"{comp.name} compression failed: {exc}") from exc


def decompress(
    data: bytes | bytearray | memoryview,
    method_or_mime: str,
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
) -> bytes:
    """Decompress ``data`` compressed with ``method_or_mime``.

    Args:
        data: compressed bytes.
        method_or_mime: the ``compression`` header value or an alias.
        max_size: the most output bytes allowed; None disables the guard.

    Raises:
        ConfigurationError: unknown method (``MissingDependency`` if not installed).
        DecodeError: corrupt or truncated input, or output beyond ``max_size``.
    """
    comp = get_compressor(method_or_mime)
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        return comp.decompress(data, max_size)
    except ConveyorError:
        raise
    except Exception as exc:  # zlib.error, OSError, LZMAError, ZstdError, brotli.error, ...
        raise DecodeError(f"corrupt {comp.name} data: {type(exc).__name__}: {exc}") from exc

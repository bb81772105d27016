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
:data:`DEFAULT_MAX_SIZE`, 64 MiB) and raises :class:`~conveyor.core.errors.DecodeError`. Every
codec is decoded incrementally, at most :data:`STEP` (1 MiB) of output per step, and the
output is counted *while* decoding: a payload that inflates past the limit is refused after
producing at most ``max_size`` plus one step, whatever its ratio (a 3 KB brotli message that
inflates to 2 GiB costs about ``max_size``). A payload within the limit briefly holds twice
its size while the steps are joined. zstd: the frame's declared size is refused up front when
it exceeds the limit, and compressed input is fed in slices small enough that one slice
cannot produce more than the room left (an RLE block turns 4 bytes into 128 KiB). brotli
needs ``brotli >= 1.2`` (its ``output_buffer_limit``); an older brotli is refused for
decoding rather than decoded without a bound.

Accepted methods: ``accept`` (the ``accept_compression`` setting) names the methods a decoder
takes, by alias or MIME type; :data:`BUILTIN_METHODS` (every built-in) by default. None or an
empty list accepts no compressed payload at all. A refused method raises
:class:`~conveyor.core.errors.ContentDisallowed` before a byte is decoded.

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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from conveyor.core.errors import (
    ConfigurationError,
    ContentDisallowed,
    ConveyorError,
    DecodeError,
    EncodeError,
    MissingDependency,
)
from conveyor.core.options import closest
from conveyor.core.serializers import missing_dependency

__all__ = [
    "BUILTIN_METHODS",
    "DEFAULT_MAX_SIZE",
    "STEP",
    "Compressor",
    "compress",
    "decompress",
    "get_compressor",
    "is_available",
    "known_methods",
    "mime_type",
    "normalize_accept_compression",
]

#: Default ceiling on decompressed size: 64 MiB (bytes).
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
#: Most output bytes one decoding step may produce; what a refused bomb costs beyond the limit.
STEP = 1024 * 1024
#: Every built-in method (canonical names): the default of ``accept_compression``.
BUILTIN_METHODS: tuple[str, ...] = ("zlib", "bzip2", "lzma", "zstd", "brotli")


class _StreamDecompressor(Protocol):
    """The shape shared by ``bz2.BZ2Decompressor`` and ``lzma.LZMADecompressor``."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

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
            truncated or oversized input, never producing more than ``max_size`` plus
            :data:`STEP` bytes.
    """

    name: str
    mime: str
    aliases: tuple[str, ...]
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int | None], bytes]


def _too_big(limit: int) -> DecodeError:
    return DecodeError(f"decompressed payload exceeds the limit of {limit} bytes")


class _Output:
    """Collects decoded chunks, counting them against the limit as they come."""

    __slots__ = ("chunks", "limit", "total")

    def __init__(self, limit: int | None) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.total = 0

    def room(self) -> int:
        """The most bytes the next step may produce: one past the limit shows it was passed."""
        if self.limit is None:
            return STEP
        return max(1, min(STEP, self.limit + 1 - self.total))

    def add(self, chunk: bytes) -> None:
        if chunk:
            self.total += len(chunk)
            if self.limit is not None and self.total > self.limit:
                self.chunks.clear()  # let the memory go before the error travels up
                raise _too_big(self.limit)
            self.chunks.append(chunk)

    def result(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


# -------------------------------------------------------------------------------------- zlib


def _zlib_decompress(data: bytes, limit: int | None) -> bytes:
    d = zlib.decompressobj()
    out = _Output(limit)
    pending = data
    while not d.eof:
        chunk = d.decompress(pending, out.room())
        out.add(chunk)
        stalled = not chunk and len(d.unconsumed_tail) == len(pending)
        pending = d.unconsumed_tail
        if stalled:
            raise DecodeError("zlib stream is truncated (no end-of-stream marker)")
    # Trailing bytes after the stream are ignored, as zlib.decompress (and kombu) does.
    return out.result()


# ---------------------------------------------------------------------------- bzip2 and lzma


def _multistream(
    factory: Callable[[], _StreamDecompressor], data: bytes, limit: int | None, what: str
) -> bytes:
    """Decode concatenated streams like ``bz2.decompress``/``lzma.decompress``, bounded."""
    out = _Output(limit)
    first = True
    while data:
        d = factory()
        try:
            out.add(d.decompress(data, out.room()))
            while not d.eof:
                if d.needs_input:
                    raise DecodeError(f"{what} data is truncated (no end-of-stream marker)")
                out.add(d.decompress(b"", out.room()))
        except (OSError, EOFError, lzma.LZMAError, ValueError):
            # The stdlib functions ignore trailing data that is not another stream.
            if first:
                raise
            break
        first = False
        data = d.unused_data
    if first:
        raise DecodeError(f"{what} data is empty")
    return out.result()


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


#: Densest zstd construct: an RLE block turns 4 input bytes into 128 KiB of output, so one
#: input byte yields at most 32 KiB (plus one block completed by it).
_ZSTD_BYTES_PER_INPUT = 32 * 1024
_ZSTD_BLOCK = 128 * 1024


def _zstd_slice(room: int) -> int:
    """Input bytes that cannot produce more than ``room`` output (at least 4)."""
    return max(4, (room - _ZSTD_BLOCK) // _ZSTD_BYTES_PER_INPUT)


def _zstd_decompress(data: bytes, limit: int | None) -> bytes:
    """Decode every frame (like ``compression.zstd.decompress``, which kombu 5.7 uses).

    zstandard's decompression object has no output bound, so its input is fed in slices
    sized to the room left; trailing bytes that are not a frame are ignored, as for zlib.
    """
    zstd = _zstandard()
    declared: int = zstd.frame_content_size(data)
    if limit is not None and declared > limit:
        raise _too_big(limit)  # refused before anything is allocated
    out = _Output(limit)
    first = True
    while data:
        dobj = zstd.ZstdDecompressor().decompressobj()
        pos = 0
        try:
            while not dobj.eof and pos < len(data):
                room = STEP if limit is None else max(1, limit + 1 - out.total)
                size = len(data) if limit is None else _zstd_slice(room)
                out.add(dobj.decompress(data[pos : pos + size]))
                pos += size
        except zstd.ZstdError:
            if first:
                raise
            break
        if not dobj.eof:
            if first:
                raise DecodeError("zstd frame is truncated")
            break
        first = False
        data = dobj.unused_data + data[pos:]
    if first:
        raise DecodeError("zstd data is empty")
    return out.result()


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


def _old_brotli(module: Any) -> MissingDependency:
    err = MissingDependency("brotli decompression", "brotli", "brotli>=1.2")
    err.pip_command = "pip install 'brotli>=1.2'"
    version = getattr(module, "__version__", "?")
    err.args = (
        f"brotli {version} cannot bound its output (output_buffer_limit came in 1.2), so a "
        f"small message could inflate to gigabytes: run {err.pip_command}",
    )
    return err


def _brotli_decompress(data: bytes, limit: int | None) -> bytes:
    module = _brotli()
    d = module.Decompressor()
    out = _Output(limit)
    try:
        chunk = d.process(data, output_buffer_limit=out.room())
    except TypeError:  # brotli < 1.2: no output_buffer_limit keyword
        raise _old_brotli(module) from None
    out.add(chunk)
    while not d.is_finished():
        if d.can_accept_more_data():  # every input byte was given and the stream goes on
            raise DecodeError("brotli stream is truncated")
        out.add(d.process(b"", output_buffer_limit=out.room()))
    return out.result()


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
    found = None
    if isinstance(method_or_mime, str):  # a header from outside may be anything
        found = _LOOKUP.get(method_or_mime) or _LOOKUP.get(method_or_mime.strip().lower())
    if found is None:
        names = sorted(alias for c in _BUILTINS for alias in c.aliases)
        shown = repr(method_or_mime)
        shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
        hint = closest(shown.strip("'\""), list(_LOOKUP)) if len(shown) <= 80 else None
        did = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigurationError(
            f"unknown compression method {shown}.{did} Known methods: {', '.join(names)}."
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


def normalize_accept_compression(accept: Collection[str] | str | None) -> frozenset[str]:
    """The canonical names of the methods ``accept`` allows (the ``accept_compression`` setting).

    Do this once at configuration time and pass the result to :func:`decompress`.

    Args:
        accept: aliases and/or MIME types, a comma-separated string, or None / empty for
            none at all.

    Raises:
        ConfigurationError: an unknown method (with did-you-mean); installed or not does not
            matter here.
    """
    if accept is None:
        return frozenset()
    if isinstance(accept, str):
        accept = [part for part in (p.strip() for p in accept.split(",")) if part]
    return frozenset(get_compressor(entry).name for entry in accept)


def _check_accepted(comp: Compressor, accept: Collection[str] | str | None) -> None:
    if accept is BUILTIN_METHODS:
        return
    if isinstance(accept, (frozenset, set)) and comp.name in accept:
        return  # normalized at configuration time: one set lookup
    try:
        allowed = normalize_accept_compression(accept)
    except ConfigurationError as exc:
        raise ConfigurationError(f"bad accept_compression: {exc}") from None
    if comp.name not in allowed:
        raise ContentDisallowed(comp.mime, allowed, what="compression")


def decompress(
    data: bytes | bytearray | memoryview,
    method_or_mime: str,
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept: Collection[str] | str | None = BUILTIN_METHODS,
) -> bytes:
    """Decompress ``data`` compressed with ``method_or_mime``, never past ``max_size``.

    Args:
        data: compressed bytes.
        method_or_mime: the ``compression`` header value or an alias.
        max_size: the most output bytes allowed; None disables the guard.
        accept: the methods allowed (aliases, MIME types, or the set
            :func:`normalize_accept_compression` returns); None or empty allows none.

    Raises:
        ConfigurationError: unknown method (``MissingDependency`` if not installed).
        ContentDisallowed: the method is not in ``accept`` (checked first).
        DecodeError: corrupt or truncated input, or output beyond ``max_size``.
    """
    comp = get_compressor(method_or_mime)
    _check_accepted(comp, accept)
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        return comp.decompress(data, max_size)
    except ConveyorError:
        raise
    except MemoryError:
        raise DecodeError(f"{comp.name} data needs more memory than is available") from None
    except Exception as exc:  # zlib.error, OSError, LZMAError, ZstdError, brotli.error, ...
        raise DecodeError(f"corrupt {comp.name} data: {type(exc).__name__}: {exc}") from exc

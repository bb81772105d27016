"""Body serializers keyed by content type, with an accept list checked before decoding.

Built-ins, byte-compatible with kombu 5.x (and so with Celery):

=========  ============================  ==================  =================================
name       content type                  content encoding    notes
=========  ============================  ==================  =================================
json       ``application/json``          ``utf-8``           kombu's JSON codec (see below)
msgpack    ``application/x-msgpack``     ``binary``          needs ``conveyor[msgpack]``
yaml       ``application/x-yaml``        ``utf-8``           ``safe_dump``/``safe_load``;
                                                             needs ``conveyor[yaml]``
pickle     ``application/x-python-       ``binary``          registered so it can be named,
           serialize``                                       never accepted unless named
=========  ============================  ==================  =================================

JSON produces exactly the bytes of :mod:`kombu.utils.json` (kombu >= 5.3), including its
``{"__type__": ..., "__value__": ...}`` wrappers for ``datetime``, ``date``, ``time``,
``Decimal``, ``UUID`` and ``bytes``; ``tests/unit/test_serializers.py`` compares the two. The
codec is written out here rather than imported: ``import kombu.utils.json`` pulls in kombu's
package, py-amqp and ``importlib.metadata``, 13 MiB of a worker's resident memory. Types
registered with kombu's ``register_type`` are not seen here. Payloads from kombu < 5.3, which
wrote those values as plain strings, decode fine: the strings simply stay strings.

Accept lists: :meth:`SerializerRegistry.decode` refuses any content type not in ``accept``
*before* looking at the bytes (:class:`~conveyor.core.errors.ContentDisallowed`). Entries may be
serializer names (``"json"``) or content types (``"application/json"``). A content type with no
registered serializer is always refused with ``ContentDisallowed``, whatever the accept list
says: nothing here can decode it, and the caller's remedy (dead-letter it) is the same.

Errors: malformed bytes raise :class:`~conveyor.core.errors.DecodeError`, values the serializer
cannot represent raise :class:`~conveyor.core.errors.EncodeError` (the codec's own exception is
chained, never leaked), a missing optional package raises
:class:`~conveyor.core.errors.MissingDependency`.

Thread-safety: a registry may be shared by threads; :meth:`SerializerRegistry.register` is not
meant to race with encode/decode (register at start-up).
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from conveyor.core.errors import (
    ConfigurationError,
    ContentDisallowed,
    ConveyorError,
    DecodeError,
    EncodeError,
    MissingDependency,
)
from conveyor.core.options import closest

__all__ = [
    "DEFAULT_ACCEPT",
    "Serializer",
    "SerializerRegistry",
    "decode",
    "default_serializers",
    "encode",
    "missing_dependency",
    "normalize_accept",
]

#: What a decoder accepts when the caller does not say: JSON only (Celery's default too).
DEFAULT_ACCEPT: tuple[str, ...] = ("json",)

#: kombu's default pickle protocol (it reads ``PICKLE_PROTOCOL``; we pin the default).
_PICKLE_PROTOCOL = 4


def missing_dependency(what: str, extra: str | None, package: str) -> MissingDependency:
    """Build a :class:`MissingDependency` for an optional codec, worded for codecs.

    ``MissingDependency``'s own message talks about URL schemes; a serializer or compressor is
    not one, so the message is replaced while keeping the attributes callers rely on.

    Args:
        what: the feature that needs the package, e.g. ``"msgpack serializer"``.
        extra: the ``conveyor[extra]`` that installs it, or None when there is no extra.
        package: the import/distribution name of the missing package.
    """
    err = MissingDependency(what, extra or package, package)
    if extra is None:
        err.pip_command = f"pip install {package}"
    message = (
        f"the {what} needs the {package!r} package, which is not installed: run {err.pip_command}"
    )
    err.args = (message,)
    return err


@dataclass(frozen=True, slots=True)
class Serializer:
    """One body codec.

    Attributes:
        name: short name used in configuration (``"json"``).
        content_type: MIME type put on the wire (``"application/json"``).
        content_encoding: character set of the encoded bytes (``"utf-8"``), or ``"binary"``.
        dumps: value -> bytes. May raise anything; the registry wraps it in ``EncodeError``
            (a :class:`ConveyorError` such as ``MissingDependency`` passes through unchanged).
        loads: bytes -> value. May raise anything; the registry wraps it in ``DecodeError``
            (a ``ConveyorError`` passes through unchanged).
    """

    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


# ---------------------------------------------------------------------------- built-in codecs


def _wrapped(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


class _KombuJSONEncoder(json.JSONEncoder):
    """kombu's ``JSONEncoder``: ``__json__`` reducers, then its default wrappers, in its order
    (``datetime`` before ``date``, of which it is a subclass)."""

    def default(self, o: Any) -> Any:
        reducer = getattr(o, "__json__", None)
        if reducer is not None:
            return reducer()
        if isinstance(o, datetime):
            return _wrapped("datetime", o.isoformat())
        if isinstance(o, date):
            return _wrapped("date", o.isoformat())
        if isinstance(o, time):
            return _wrapped("time", o.isoformat())
        if isinstance(o, Decimal):
            return _wrapped("decimal", str(o))
        if isinstance(o, uuid.UUID):
            return _wrapped("uuid", {"hex": o.hex})
        if isinstance(o, bytes):
            try:
                return _wrapped("bytes", o.decode("utf-8"))
            except UnicodeDecodeError:
                return _wrapped("base64", base64.b64encode(o).decode("utf-8"))
        return super().default(o)


_KOMBU_DECODERS: dict[str, Callable[[Any], Any]] = {
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("utf-8")),
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(**v),
}


def _kombu_object_hook(obj: dict[str, Any]) -> Any:
    if obj.keys() == {"__type__", "__value__"}:
        decoder = _KOMBU_DECODERS.get(obj["__type__"])
        if decoder is None:
            raise ValueError("Unsupported type", obj["__type__"], obj)
        return decoder(obj["__value__"])
    return obj


# kombu's dumps/loads build a new encoder/decoder on every call (json.dumps(cls=...),
# json.loads(object_hook=...)); for a small task message that was ~10% of publishing it.
# These two are built once. Both are stateless between calls: safe to share between threads.
_kombu_encoder = _KombuJSONEncoder()
_kombu_decoder = json.JSONDecoder(object_hook=_kombu_object_hook)


def kombu_json_text(obj: Any) -> str:
    """``kombu.utils.json.dumps(obj)``, byte for byte, without its per-call set-up."""
    return _kombu_encoder.encode(obj)


def kombu_json_load(data: bytes | bytearray | memoryview | str) -> Any:
    """``kombu.utils.json.loads(data)`` (same values, same errors), without its set-up."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    elif isinstance(data, memoryview):
        data = data.tobytes().decode("utf-8")
    if data.startswith("\ufeff"):  # json.loads refuses a BOM; so must we
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    return _kombu_decoder.decode(data)


def _json_dumps(obj: Any) -> bytes:
    # kombu's dumps returns text; kombu's producer encodes it as utf-8, so do we.
    return _kombu_encoder.encode(obj).encode("utf-8")


def _json_loads(data: bytes) -> Any:
    return kombu_json_load(data)


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise missing_dependency("msgpack serializer", "msgpack", "msgpack") from None
    return msgpack


def _msgpack_dumps(obj: Any) -> bytes:
    packed: bytes = _msgpack().packb(obj, use_bin_type=True)
    return packed


def _msgpack_loads(data: bytes) -> Any:
    return _msgpack().unpackb(data, raw=False)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise missing_dependency("yaml serializer", "yaml", "PyYAML") from None
    return yaml


def _yaml_dumps(obj: Any) -> bytes:
    text: str = _yaml().safe_dump(obj)
    return text.encode("utf-8")


def _yaml_loads(data: bytes) -> Any:
    return _yaml().safe_load(data)


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _pickle_loads(data: bytes) -> Any:
    # Only reachable when the caller's accept list names pickle explicitly.
    return pickle.loads(data)  # noqa: S301 - opt-in only, see module docstring


BUILTIN_SERIALIZERS: tuple[Serializer, ...] = (
    Serializer("json", "application/json", "utf-8", _json_dumps, _json_loads),
    Serializer("msgpack", "application/x-msgpack", "binary", _msgpack_dumps, _msgpack_loads),
    Serializer("yaml", "application/x-yaml", "utf-8", _yaml_dumps, _yaml_loads),
    Serializer("pickle", "application/x-python-serialize", "binary", _pickle_dumps, _pickle_loads),
)


def _as_bytes(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _bare_content_type(content_type: str) -> str:
    # "Application/JSON; charset=utf-8" -> "application/json"; only used on a lookup miss.
    return content_type.split(";", 1)[0].strip().lower()


class SerializerRegistry:
    """Serializers by name and by content type.

    Lookups are two dict reads; nothing scans the registry per call.

    Args:
        serializers: the initial set; defaults to the built-ins (json, msgpack, yaml, pickle).
    """

    __slots__ = ("_by_name", "_by_type")

    def __init__(self, serializers: Collection[Serializer] | None = None) -> None:
        self._by_name: dict[str, Serializer] = {}
        self._by_type: dict[str, Serializer] = {}
        for serializer in BUILTIN_SERIALIZERS if serializers is None else serializers:
            self.register(serializer)

    # -------------------------------------------------------------------------- registration

    def register(self, serializer: Serializer, *, replace: bool = False) -> None:
        """Add ``serializer``.

        Raises:
            ConfigurationError: its name or content type is taken and ``replace`` is False.
        """
        if not replace:
            taken = self._by_name.get(serializer.name) or self._by_type.get(serializer.content_type)
            if taken is not None:
                raise ConfigurationError(
                    f"serializer {serializer.name!r} ({serializer.content_type}) clashes with "
                    f"the registered {taken.name!r} ({taken.content_type}); "
                    "pass replace=True to replace it"
                )
        old = self._by_name.pop(serializer.name, None)
        if old is not None:
            self._by_type.pop(old.content_type, None)
        self._by_name[serializer.name] = serializer
        self._by_type[serializer.content_type] = serializer

    def copy(self) -> SerializerRegistry:
        """An independent registry with the same serializers (to extend without side effects)."""
        return SerializerRegistry(list(self._by_name.values()))

    @property
    def names(self) -> Mapping[str, Serializer]:
        """Read-only view: name -> serializer."""
        return MappingProxyType(self._by_name)

    def get(self, name_or_content_type: str) -> Serializer:
        """The serializer called ``name_or_content_type`` (a name or a content type).

        Raises:
            ConfigurationError: unknown, with a did-you-mean and the known names.
        """
        found = self._by_name.get(name_or_content_type) or self._by_type.get(name_or_content_type)
        if found is None:
            found = self._by_type.get(_bare_content_type(name_or_content_type))
        if found is None:
            raise self._unknown(name_or_content_type)
        return found

    def _unknown(self, what: str) -> ConfigurationError:
        candidates = [*self._by_name, *self._by_type]
        hint = closest(what, candidates)
        did = f" Did you mean {hint!r}?" if hint else ""
        return ConfigurationError(
            f"unknown serializer {what!r}.{did} Known serializers: "
            f"{', '.join(sorted(self._by_name))}."
        )

    def normalize_accept(self, accept: Collection[str] | str | None) -> frozenset[str]:
        """Turn an accept list of names and/or content types into a set of content types.

        Do this once at configuration time and pass the result to :meth:`decode`; membership
        is then a single set lookup.

        Args:
            accept: names (``"json"``), content types (``"application/json"``), a single
                string, or None for :data:`DEFAULT_ACCEPT`.

        Raises:
            ConfigurationError: an entry is not a registered serializer (with did-you-mean).
        """
        if accept is None:
            accept = DEFAULT_ACCEPT
        elif isinstance(accept, str):
            accept = (accept,)
        return frozenset(self.get(entry).content_type for entry in accept)

    # ----------------------------------------------------------------------------- hot path

    def check_accept(
        self, content_type: str, accept: Collection[str] | str | None = None
    ) -> Serializer:
        """The serializer for ``content_type`` if ``accept`` allows it.

        Cheap (two dict reads and a membership test): call it before any other work on a
        payload, e.g. before decompressing it.

        Args:
            content_type: the payload's MIME type.
            accept: names and/or content types; None means :data:`DEFAULT_ACCEPT`.

        Raises:
            ContentDisallowed: not accepted, or no serializer is registered for it.
        """
        if accept is None:
            accept = DEFAULT_ACCEPT
        elif isinstance(accept, str):  # "json" must not turn into a substring test
            accept = (accept,)
        ser = self._by_type.get(content_type)
        if ser is None:
            ser = self._by_type.get(_bare_content_type(content_type or ""))
        if ser is None or not (ser.content_type in accept or ser.name in accept):
            raise ContentDisallowed(content_type or "", accept)
        return ser

    def encode(self, obj: Any, serializer: str = "json") -> tuple[bytes, str, str]:
        """Serialize ``obj``.

        Args:
            obj: the value.
            serializer: a registered name or content type.

        Returns:
            ``(body, content_type, content_encoding)``.

        Raises:
            ConfigurationError: unknown serializer (``MissingDependency`` when its package is
                not installed).
            EncodeError: the serializer cannot represent ``obj``.
        """
        ser = self._by_name.get(serializer) or self.get(serializer)
        try:
            body = ser.dumps(obj)
        except ConveyorError:
            raise
        except Exception as exc:
            raise EncodeError(f"cannot encode value with {ser.name}: {exc}") from exc
        return body, ser.content_type, ser.content_encoding

    def decode(
        self,
        body: bytes | bytearray | memoryview | str,
        content_type: str,
        content_encoding: str | None = None,
        *,
        accept: Collection[str] | str | None = None,
    ) -> Any:
        """Deserialize ``body`` after checking ``content_type`` against ``accept``.

        Args:
            body: the payload (``str`` is taken as UTF-8 text).
            content_type: the payload's MIME type. Parameters (``; charset=...``) and case
                are tolerated.
            content_encoding: informational; each serializer knows its own encoding (kombu
                ignores it for registered types too).
            accept: names and/or content types, ideally pre-normalized with
                :meth:`normalize_accept`; None means :data:`DEFAULT_ACCEPT`.

        Raises:
            ContentDisallowed: ``content_type`` is not accepted, or nothing is registered for
                it. Checked before the bytes are touched.
            DecodeError: the bytes are malformed for the content type.
            MissingDependency: the content type is accepted but its package is missing.
        """
        ser = self.check_accept(content_type, accept)
        try:
            return ser.loads(_as_bytes(body))
        except ConveyorError:
            raise
        except Exception as exc:  # RecursionError, UnicodeDecodeError, ValueError, ...
            raise DecodeError(
                f"malformed {ser.content_type} payload: {type(exc).__name__}: {exc}"
            ) from exc


#: The process-wide default registry. Pass your own :class:`SerializerRegistry` where an API
#: takes ``serializers=`` to extend it without touching this one.
default_serializers = SerializerRegistry()


def encode(obj: Any, serializer: str = "json") -> tuple[bytes, str, str]:
    """:meth:`SerializerRegistry.encode` on :data:`default_serializers`."""
    return default_serializers.encode(obj, serializer)


def decode(
    body: bytes | bytearray | memoryview | str,
    content_type: str,
    content_encoding: str | None = None,
    *,
    accept: Collection[str] | str | None = None,
) -> Any:
    """:meth:`SerializerRegistry.decode` on :data:`default_serializers`."""
    return default_serializers.decode(body, content_type, content_encoding, accept=accept)


def normalize_accept(accept: Collection[str] | str | None) -> frozenset[str]:
    """:meth:`SerializerRegistry.normalize_accept` on :data:`default_serializers`."""
    return default_serializers.normalize_accept(accept)

"""The one exception tree of conveyor.

Errors are grouped by what the *caller* can do about them:

```
ConveyorError
├── ConfigurationError          fix the configuration; retrying will not help
│   ├── InvalidURL
│   ├── UnknownScheme
│   └── MissingDependency
├── UnsupportedFeature          the implementation does not declare the capability
├── SerializationError          the payload is bad; dead-letter it
│   ├── EncodeError
│   ├── DecodeError
│   └── ContentDisallowed
├── QueueNotFound
├── InvalidReceipt              the delivery is not (or no longer) held by this consumer
├── TaskError                   a task failed and its exception type could not be rebuilt
└── OperationalError            transient: retry with backoff
    ├── ConnectionLost
    └── OperationTimeout
```

Each implementation translates its driver's exceptions into this tree in exactly one place,
always chaining the original (``raise ConnectionLost(...) from exc``) so nothing is hidden.
No name here shadows a builtin (``ConnectionError``, ``TimeoutError`` are avoided on purpose).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ConfigurationError",
    "ConnectionLost",
    "ContentDisallowed",
    "ConveyorError",
    "DecodeError",
    "EncodeError",
    "InvalidReceipt",
    "InvalidURL",
    "MissingDependency",
    "OperationTimeout",
    "OperationalError",
    "QueueNotFound",
    "SerializationError",
    "TaskError",
    "UnknownScheme",
    "UnsupportedFeature",
]


class ConveyorError(Exception):
    """Root of every exception conveyor raises on purpose."""


class ConfigurationError(ConveyorError):
    """The configuration is wrong; retrying the same call cannot succeed."""


class InvalidURL(ConfigurationError):
    """A URL is empty, malformed, or has an invalid component (port, host, query)."""


class UnknownScheme(ConfigurationError):
    """No broker or result backend is registered for a URL scheme."""

    def __init__(
        self, scheme: str, known: Iterable[str], *, kind: str, suggestion: str | None = None
    ) -> None:
        self.scheme = scheme
        self.known = sorted(set(known))
        self.kind = kind
        self.suggestion = suggestion
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(
            f"unknown {kind} scheme {scheme!r}.{hint} Known schemes: {', '.join(self.known)}."
        )


class MissingDependency(ConfigurationError):
    """A known scheme needs a driver package that is not installed."""

    def __init__(self, scheme: str, extra: str, missing: str) -> None:
        self.scheme = scheme
        self.extra = extra
        self.missing = missing
        self.pip_command = f"pip install 'conveyor[{extra}]'"
        super().__init__(
            f"the {scheme!r} scheme needs the {missing!r} package, which is not installed: "
            f"run {self.pip_command}"
        )


class UnsupportedFeature(ConveyorError):
    """The implementation does not declare the capability an operation needs."""

    def __init__(self, implementation: str, capability: str, detail: str = "") -> None:
        self.implementation = implementation
        self.capability = capability
        more = f": {detail}" if detail else ""
        super().__init__(f"{implementation} does not support {capability!r}{more}")


class SerializationError(ConveyorError):
    """A value could not be encoded, or a payload could not be decoded."""


class EncodeError(SerializationError):
    """A value could not be serialized."""


class DecodeError(SerializationError):
    """A payload could not be deserialized (bad bytes, truncated, wrong shape)."""


class ContentDisallowed(SerializationError):
    """A payload's content type (or compression method) is not in the accept list.

    Args:
        content_type: the refused content type, or compression MIME type.
        accepted: what the accept list allows.
        what: ``"content type"``, or ``"compression"`` for the ``accept_compression`` list.
    """

    def __init__(
        self, content_type: str, accepted: Iterable[str], *, what: str = "content type"
    ) -> None:
        self.content_type = content_type
        self.accepted = sorted(accepted)
        self.what = what
        where = "accept_compression" if what == "compression" else "the accept list"
        super().__init__(
            f"refusing to decode {what} {content_type!r}: not in {where} {self.accepted}"
        )


class QueueNotFound(ConveyorError):
    """A queue that must exist does not."""


class InvalidReceipt(ConveyorError):
    """A delivery is not held by this consumer (lease lost, already settled elsewhere)."""


class TaskError(ConveyorError):
    """A task failed with an exception type that cannot be rebuilt safely here.

    Attributes:
        exc_type: the remote exception's qualified class name.
        exc_module: the module the remote exception class lives in.
        exc_message: the remote exception's ``args``.
        remote_traceback: the remote traceback text, if stored.
    """

    def __init__(
        self,
        exc_type: str,
        exc_message: object,
        exc_module: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback
        where = f"{exc_module}." if exc_module and exc_module != "builtins" else ""
        super().__init__(f"{where}{exc_type}: {exc_message!r}")


class OperationalError(ConveyorError):
    """A transient failure talking to a server. Safe to retry with backoff."""


class ConnectionLost(OperationalError):
    """The connection failed or dropped."""


class OperationTimeout(OperationalError):
    """An operation did not complete within its time limit."""

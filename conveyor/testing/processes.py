"""The implementation under test, built again in another process that the suite can SIGKILL.

The suites prove the guarantees that involve more than one process (``durable``,
``cross_process``, a ``wait`` woken by a store from another process) with real operating
system processes. A :class:`ChildProcess` is a fresh Python interpreter started with
:mod:`subprocess` (not ``fork``: nothing of the test process, neither its threads, nor its
locks, nor its open connections, leaks into the child). It builds the implementation from a
:class:`ProcessRecipe`, answers one JSON line per command on its stdout, and is SIGKILLed by
the suite at the moment under test (or kills itself, to die exactly after a call returned).

A recipe is an import path and a URL, so a third party whose implementation is built by
``MyBroker.from_url(url, **options)`` gets it for free: :meth:`ProcessRecipe.of` derives
``"acme.broker:MyBroker.from_url"`` and ``broker.url`` from the instance under test. Anything
else overrides the suite's ``broker_process_recipe`` / ``result_backend_process_recipe``
fixture with an explicit recipe (a different factory, or keyword options as JSON).

The child gets the test process's ``sys.path`` (so modules pytest put on it import there
too) and the recipe on its stdin, never on its command line, where other users of the
machine could read a password. Only the child's answers use its stdout: whatever the
implementation prints goes to its stderr, whose tail every failure message quotes.

SIGKILL needs a POSIX system; elsewhere the tests that need it skip.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from time import monotonic
from typing import IO, Any

import pytest

from conveyor.core.types import READY_STATES, Envelope, ResultRecord, State
from conveyor.core.urls import mask_url

__all__ = [
    "ChildProcess",
    "ProcessRecipe",
    "child_main",
    "envelope_from_json",
    "envelope_to_json",
    "require_sigkill",
]

#: What the child runs: read the hello line, take the parent's import path, serve commands.
_BOOTSTRAP = (
    "import json, sys\n"
    "hello = json.loads(sys.stdin.readline())\n"
    "sys.path[:] = hello['path'] + [p for p in sys.path if p not in hello['path']]\n"
    "from conveyor.testing.processes import child_main\n"
    "child_main(hello)\n"
)
_STDERR_TAIL = 4000


def require_sigkill() -> int:
    """``signal.SIGKILL``, or skip the test on a system without it."""
    number = getattr(signal, "SIGKILL", None)
    if number is None:
        pytest.skip("killing a process with SIGKILL needs a POSIX system")
    return int(number)


@dataclass(frozen=True, repr=False)
class ProcessRecipe:
    """How a fresh Python process builds the implementation under test.

    The child imports ``factory`` (``"package.module:attribute.path"``, for example
    ``"acme.broker:AcmeBroker.from_url"``) and calls ``factory(url, **options, **extra)``,
    where ``extra`` are the options a test adds (``lease_seconds=...``). It must build a new
    client of the SAME queues or results the test uses, as ``make_broker`` /
    ``make_result_backend`` do in the test process.

    Attributes:
        factory: import path of a callable ``(url, **options) -> implementation``.
        url: the URL passed to it (passwords included: it travels on a pipe, never argv).
        options: keyword options; must be JSON-serializable.
    """

    factory: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, implementation: Any) -> ProcessRecipe | None:
        """``type(implementation).from_url(implementation.url)``, or None when that cannot
        work: no ``url``, no ``from_url``, or a class another process cannot import."""
        kind = type(implementation)
        url = getattr(implementation, "url", None)
        if not isinstance(url, str) or not url or not callable(getattr(kind, "from_url", None)):
            return None
        if kind.__module__ == "__main__" or "<locals>" in kind.__qualname__:
            return None
        return cls(f"{kind.__module__}:{kind.__qualname__}.from_url", url)

    def build(self, **extra: Any) -> Any:
        """Import the factory and call it (this runs in the child)."""
        module_name, _, attribute = self.factory.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"factory must be 'module:attribute', got {self.factory!r}")
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target(self.url, **{**self.options, **extra})

    def __repr__(self) -> str:
        return f"ProcessRecipe({self.factory!r}, {mask_url(self.url)!r}, {dict(self.options)!r})"


def envelope_to_json(envelope: Envelope) -> dict[str, Any]:
    """An envelope as JSON-serializable data (the body in base64)."""
    return {
        "id": envelope.id,
        "body": base64.b64encode(envelope.body).decode("ascii"),
        "content_type": envelope.content_type,
        "content_encoding": envelope.content_encoding,
        "headers": dict(envelope.headers),
        "priority": envelope.priority,
        "correlation_id": envelope.correlation_id,
        "reply_to": envelope.reply_to,
    }


def envelope_from_json(data: Mapping[str, Any]) -> Envelope:
    """The inverse of :func:`envelope_to_json`."""
    return Envelope(
        id=data["id"],
        body=base64.b64decode(data["body"]),
        content_type=data["content_type"],
        content_encoding=data["content_encoding"],
        headers=data["headers"],
        priority=data["priority"],
        correlation_id=data["correlation_id"],
        reply_to=data["reply_to"],
    )


class ChildProcess:
    """An implementation built from a :class:`ProcessRecipe` in a fresh Python process.

    Every wait is bounded by ``timeout`` seconds; a child that does not answer in time, exits,
    or fails a command makes the call raise ``AssertionError`` quoting the child's error and
    the tail of its stderr. :meth:`close` always ends the process.

    Commands (see :func:`child_main`): ``publish`` (``envelopes``, ``many``, optionally
    ``then_sigkill``), ``receive`` (``queue``, ``count``, ``timeout``) and ``store``
    (``task_id``, ``state``, ``result``).
    """

    def __init__(
        self,
        recipe: ProcessRecipe,
        *,
        options: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        what: str = "implementation",
    ) -> None:
        self.timeout = timeout
        self.what = what
        hello = {
            "path": [p for p in sys.path if isinstance(p, str)],
            "factory": recipe.factory,
            "url": recipe.url,
            "options": dict(recipe.options),
            "extra": dict(options or {}),
        }
        try:
            line = json.dumps(hello)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{recipe!r}: options must be JSON-serializable ({exc})") from None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.pid = self._proc.pid
        self._reader = threading.Thread(
            target=self._read, name=f"conveyor-child-{self.pid}", daemon=True
        )
        self._reader.start()
        try:
            self._send(line)
            self._expect(f"building the {what} from {recipe!r}")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ commands
    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command and return the child's answer."""
        self._send(json.dumps({"op": op, **fields}))
        return self._expect(op)

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait (bounded) until the child has exited; return its return code (``-9``: SIGKILL)."""
        limit = self.timeout if timeout is None else timeout
        try:
            return self._proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(
                f"the {self.what} process {self.pid} did not exit within {limit:.0f} s"
                f"{self.stderr_tail()}"
            ) from None

    def kill(self) -> int:
        """SIGKILL the child and return its return code once it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, require_sigkill())
        return self.wait_exit()

    def close(self) -> None:
        """End the child (SIGKILL when still running) and release its pipes. Idempotent."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10.0)
        # The reader thread ends at EOF, which the child's death brings; join it before
        # closing the pipe it reads.
        self._reader.join(5.0)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()

    def stderr_tail(self) -> str:
        """The end of what the child wrote to stderr, as a suffix for error messages."""
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        text = text.strip()
        if not text:
            return ""
        return f"\n--- stderr of process {self.pid} (tail) ---\n{text[-_STDERR_TAIL:]}"

    # ------------------------------------------------------------------ plumbing
    def _read(self) -> None:
        stdout = self._proc.stdout
        try:
            if stdout is not None:
                for raw in stdout:
                    self._replies.put(raw)
        except (OSError, ValueError):
            pass
        finally:
            self._replies.put(None)

    def _send(self, line: str) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode("utf-8") + b"\n")
            stdin.flush()
        except OSError as exc:
            raise AssertionError(
                f"the {self.what} process {self.pid} is gone ({exc}; exit code "
                f"{self._proc.poll()}){self.stderr_tail()}"
            ) from None

    def _expect(self, what: str) -> dict[str, Any]:
        try:
            raw = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(
                f"the {self.what} process {self.pid} did not answer {what!r} within "
                f"{self.timeout:.0f} s{self.stderr_tail()}"
            ) from None
        if raw is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5.0)
            raise AssertionError(
                f"the {self.what} process {self.pid} exited (code {self._proc.poll()}) "
                f"during {what!r}{self.stderr_tail()}"
            )
        reply: dict[str, Any] = json.loads(raw)
        if "error" in reply:
            raise AssertionError(
                f"{what!r} failed in the {self.what} process {self.pid}: {reply['error']}\n"
                f"{reply.get('traceback', '')}{self.stderr_tail()}"
            )
        return reply


# ---------------------------------------------------------------------- the child's side
def _publish(broker: Any, command: Mapping[str, Any], reply: Callable[..., None]) -> None:
    queue_name = command["queue"]
    count = 0
    for data in command.get("envelopes", ()):
        broker.publish(envelope_from_json(data), queue=queue_name)
        count += 1
    many = [envelope_from_json(data) for data in command.get("many", ())]
    if many:
        count += broker.publish_many(many, queue=queue_name)
    reply(published=count, at=monotonic())
    if command.get("then_sigkill"):
        # Die the instant publish returned: nothing the broker buffers survives this, as
        # nothing survives a power cut or the OOM killer.
        os.kill(os.getpid(), require_sigkill())
        os._exit(70)  # not reached


def _receive(broker: Any, command: Mapping[str, Any], reply: Callable[..., None]) -> None:
    queue_name, count = command["queue"], int(command["count"])
    deadline = monotonic() + float(command["timeout"])
    got: list[Any] = []
    while len(got) < count:
        remaining = deadline - monotonic()
        if remaining <= 0:
            break
        got.extend(
            broker.receive(queue_name, max_messages=count - len(got), timeout=min(remaining, 0.5))
        )
    reply(
        deliveries=[
            {
                "envelope": envelope_to_json(d.envelope),
                "queue": d.queue,
                "redelivered": d.redelivered,
                "delivery_count": d.delivery_count,
            }
            for d in got
        ],
        at=monotonic(),
    )


def _store(backend: Any, command: Mapping[str, Any], reply: Callable[..., None]) -> None:
    state = State(command["state"])
    done = datetime.now(timezone.utc) if state in READY_STATES else None
    record = ResultRecord(command["task_id"], state, command.get("result"), date_done=done)
    before = monotonic()
    backend.store(record)
    reply(before=before, at=monotonic())


_OPERATIONS: dict[str, Callable[[Any, Mapping[str, Any], Callable[..., None]], None]] = {
    "publish": _publish,
    "receive": _receive,
    "store": _store,
}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def child_main(hello: Mapping[str, Any]) -> None:
    """The child's loop (started by :class:`ChildProcess`; not for direct use)."""
    # Answers go to a private copy of stdout; fd 1 and sys.stdout become stderr, so nothing
    # the implementation prints can be mistaken for an answer.
    channel: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**fields: Any) -> None:
        channel.write(json.dumps(fields) + "\n")
        channel.flush()

    try:
        recipe = ProcessRecipe(hello["factory"], hello["url"], hello["options"])
        implementation = recipe.build(**hello["extra"])
    except BaseException as exc:
        reply(error=_describe(exc), traceback=traceback.format_exc())
        sys.exit(1)
    reply(ready=True, pid=os.getpid())
    for line in sys.stdin:
        command = json.loads(line)
        operation = _OPERATIONS.get(command.get("op", ""))
        if operation is None:
            reply(error=f"unknown command {command.get('op')!r}")
            continue
        try:
            operation(implementation, command, reply)
        except Exception as exc:
            reply(error=_describe(exc), traceback=traceback.format_exc())

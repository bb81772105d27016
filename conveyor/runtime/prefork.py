"""The prefork pool's children: one forked process per slot, fed over a pipe.

The worker's slot thread keeps the delivery, decides everything about it (pre-checks,
storing, settling) and hands the child only ``(envelope, request)``; the child decodes and
runs the task (:func:`conveyor.runtime.execution.execute`) and sends back an
:class:`~conveyor.runtime.execution.Outcome`.

Signals: children ignore SIGTERM and SIGINT. systemd (``KillMode=control-group``) and a
terminal's Ctrl-C signal the whole process group; the parent alone decides: on a warm
shutdown it lets running tasks finish and then stops each child over its pipe, on a cold
one it kills them. Soft time limits are raised by SIGALRM in the child; at the hard limit
the parent kills the child and starts a fresh one.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import signal
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from conveyor.core.compression import BUILTIN_METHODS, DEFAULT_MAX_SIZE
from conveyor.core.types import Envelope, State
from conveyor.runtime.exceptions import TimeLimitExceeded, WorkerLostError
from conveyor.runtime.execution import Outcome, describe, execute, failure

if TYPE_CHECKING:
    from conveyor.runtime.app import App
    from conveyor.runtime.task import Request

__all__ = ["Child"]


class Child:
    """One prefork child process and the slot thread's end of its pipe.

    Args:
        app: the worker's app (the child gets a forked copy).
        ctx: a multiprocessing context (``fork``).
        index: slot number, for the process name.
        accept: content types the child may decode.
        max_size: the most bytes a body may decompress to (``worker_max_message_size``).
        accept_compression: compression methods the child may decompress.
    """

    def __init__(
        self,
        app: App,
        ctx: Any,
        index: int,
        accept: tuple[str, ...],
        *,
        max_size: int | None = DEFAULT_MAX_SIZE,
        accept_compression: Collection[str] | None = BUILTIN_METHODS,
    ) -> None:
        self.app = app
        self.ctx = ctx
        self.index = index
        self.accept = accept
        self.max_size = max_size
        self.accept_compression = accept_compression
        self.proc: Any = None
        self.conn: Any = None
        self._spawn()

    def _spawn(self) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        app, accept = self.app, self.accept
        max_size, accept_compression = self.max_size, self.accept_compression

        def run() -> None:
            parent_end.close()
            child_main(
                app, child_end, accept, max_size=max_size, accept_compression=accept_compression
            )

        self.proc = self.ctx.Process(target=run, name=f"conveyor-child-{self.index}", daemon=True)
        self.proc.start()
        child_end.close()
        self.conn = parent_end

    def stop(self, *, kill: bool) -> None:
        """Stop the child: over the pipe (it finishes its task first), or by SIGKILL.
        Always reaps it: a child left alive would hang the interpreter's exit (it ignores
        the SIGTERM multiprocessing sends daemonic children then)."""
        with contextlib.suppress(OSError, ValueError):
            if kill:
                self.proc.kill()
            else:
                self.conn.send(None)
        self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        with contextlib.suppress(OSError):
            self.conn.close()

    def run(self, envelope: Envelope, request: Request, hard_limit: float | None) -> Outcome:
        """Run one task in the child; kill it at ``hard_limit`` seconds. Never raises."""
        started = time.monotonic()
        try:
            self.conn.send((envelope, request))
        except OSError:
            self._restart()
            return lost("worker lost: the child process was gone before the task started")
        except Exception as exc:  # cannot be pickled (e.g. headers nested too deep)
            return failure(
                exc, f"the message cannot be handed to a child: {describe(exc)}", dead_letter=True
            )
        while True:
            wait = 1.0
            if hard_limit:
                remaining = started + hard_limit - time.monotonic()
                if remaining <= 0:
                    self.proc.kill()
                    self._restart()
                    err = TimeLimitExceeded(hard_limit)
                    return failure(err, f"hard time limit ({hard_limit}s) exceeded: child killed")
                wait = min(wait, remaining)
            if self.conn.poll(wait):
                try:
                    outcome: Outcome = self.conn.recv()
                    return outcome
                except (EOFError, OSError):
                    break
                except Exception as exc:  # the outcome arrived whole but cannot be unpickled
                    return failure(exc, f"the result cannot be received: {describe(exc)}")
            if not self.proc.is_alive():
                break
        code = self.proc.exitcode
        self._restart()
        return lost(f"worker lost: child process exited with code {code} mid-task")

    def _restart(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(1.0)
        self._spawn()


def lost(reason: str) -> Outcome:
    """The outcome of a task whose process died: given back (at-least-once)."""
    return failure(WorkerLostError(reason), reason, worker_lost=True)


def child_main(
    app: App,
    conn: multiprocessing.connection.Connection,
    accept: tuple[str, ...],
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
    accept_compression: Collection[str] | None = BUILTIN_METHODS,
) -> None:
    """Loop of a prefork child: receive (envelope, request), execute, send the outcome."""
    # The parent decides when children stop: a signal to the whole process group (systemd,
    # Ctrl-C) must not end a task the parent is letting finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    app._after_fork()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        envelope, request = job
        outcome = execute(
            app,
            envelope,
            request,
            accept=accept,
            max_size=max_size,
            accept_compression=accept_compression,
            hard_limit_here=False,
        )
        try:
            conn.send(outcome)
        except OSError:
            return
        except Exception as exc:  # an unpicklable return value fails the task
            reason = f"result cannot be sent back: {describe(exc)}"
            try:
                conn.send(failure(exc, reason))
            except Exception:
                conn.send(Outcome(State.FAILURE.value, None, None, reason=reason))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the worker process dies (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

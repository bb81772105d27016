"""Child processes of the tests, ended whatever happens."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def terminating(proc: subprocess.Popen[bytes], grace: float = 5.0) -> Iterator[None]:
    """Always end ``proc`` (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)

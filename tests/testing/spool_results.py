"""A tiny third-party result backend: one JSON file per task in a directory.

It exists to prove that ``ResultBackendConformance`` serves implementations outside conveyor
that declare few capabilities: the suite's ``@requires`` tests skip naming what is missing,
and its "both directions" tests check that undeclared operations raise
``UnsupportedFeature`` (inherited from :class:`~conveyor.core.base.ResultBackendBase`).

Capabilities:
    ``cross_process``, ``durable`` (files on disk), ``multi_reader`` and ``expiry_sweep``
    (``purge_expired`` deletes expired files; ``fetch`` never returns an expired record).
    Not ``native_ttl``, ``wait``, ``counters``, ``groups``.

URL:
    ``spoolres:///absolute/directory`` (created when missing).

Options:
    default_ttl (float seconds or None, default 86400.0).

Thread-safety:
    Writers (``store``, ``forget``, ``purge_expired``) serialise on an ``flock`` of
    ``<dir>/.lock``, across threads and processes (POSIX only). Files are replaced
    atomically, so readers take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase
from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError, ConnectionLost, DecodeError, InvalidURL
from conveyor.core.options import build_options
from conveyor.core.types import ResultRecord, State
from conveyor.core.urls import mask_url, parse_url

__all__ = ["SpoolResultBackend", "SpoolResultBackendOptions"]


@dataclass(frozen=True)
class SpoolResultBackendOptions:
    default_ttl: float | None = DEFAULT_RESULT_TTL


def _encode(record: ResultRecord, expires_at: float | None) -> bytes:
    doc = {
        "task_id": record.task_id,
        "status": State(record.state).value,
        "result": record.result,
        "traceback": record.traceback,
        "date_done": record.date_done.isoformat() if record.date_done else None,
        "children": record.children,
        "group_id": record.group_id,
        "parent_id": record.parent_id,
        "extended": dict(record.extended),
        "expires_at": expires_at,
    }
    return json.dumps(doc, ensure_ascii=False).encode()


def _decode(data: bytes) -> tuple[ResultRecord, float | None]:
    try:
        doc = json.loads(data)
        record = ResultRecord(
            task_id=doc["task_id"],
            state=State(doc["status"]),
            result=doc["result"],
            traceback=doc["traceback"],
            date_done=datetime.fromisoformat(doc["date_done"]) if doc["date_done"] else None,
            children=doc["children"],
            group_id=doc["group_id"],
            parent_id=doc["parent_id"],
            extended=doc["extended"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"bad spool file: {exc}") from exc
    return record, doc["expires_at"]


class SpoolResultBackend(ResultBackendBase):
    """One JSON file per task id under a directory. See the module docstring."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.CROSS_PROCESS,
            Capability.DURABLE,
            Capability.MULTI_READER,
            Capability.EXPIRY_SWEEP,
        }
    )

    def __init__(self, directory: Path, options: SpoolResultBackendOptions, url: str) -> None:
        self.directory = directory
        self.options = options
        self.default_ttl = options.default_ttl
        self.url = url
        self._closed = False
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SpoolResultBackend:
        parsed = parse_url(url)
        if parsed.hosts or not parsed.path:
            raise InvalidURL(f"{mask_url(url)!r}: use spoolres:///absolute/directory")
        opts = build_options(SpoolResultBackendOptions, parsed.query, options, owner="spoolres")
        return cls(Path("/" + parsed.path), opts, url)

    def _check_open(self) -> None:
        # Nothing to release, but a closed client still refuses work, as the contract says:
        # code that uses a client after closing it is wrong and must learn so.
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    def _path(self, task_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(task_id.encode()).hexdigest()}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, path: Path) -> tuple[ResultRecord, float | None] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _decode(data)

    @staticmethod
    def _expired(expires_at: float | None, now: float) -> bool:
        return expires_at is not None and expires_at <= now

    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        if ttl is not None and ttl < 0:
            raise ConfigurationError(f"ttl must be >= 0, got {ttl!r}")
        self._check_open()
        effective = self._ttl(ttl)
        path = self._path(record.task_id)
        with self._locked():
            now = time.time()
            existing = self._read(path)
            live = existing is not None and not self._expired(existing[1], now)
            if live and existing is not None and not self._may_replace(existing[0].state.value):
                return
            data = _encode(record, None if effective is None else now + effective)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)

    def fetch(self, task_id: str) -> ResultRecord | None:
        self._check_open()
        found = self._read(self._path(task_id))
        if found is None or self._expired(found[1], time.time()):
            return None
        return found[0]

    def forget(self, task_id: str) -> None:
        self._check_open()
        with self._locked(), contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size!r}")
        self._check_open()
        names = [p for p in self.directory.iterdir() if p.suffix == ".json"]
        deleted = 0
        for start in range(0, len(names), batch_size):
            with self._locked():
                now = time.time()
                for path in names[start : start + batch_size]:
                    found = self._read(path)
                    if found is not None and self._expired(found[1], now):
                        path.unlink()
                        deleted += 1
        return deleted

    def close(self) -> None:
        """Nothing to release; idempotent. Every later operation raises ConnectionLost."""
        self._closed = True

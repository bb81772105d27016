"""The reference runtime: App, tasks, AsyncResult and the worker, on the core protocols only."""

from __future__ import annotations

from conveyor.runtime.app import App
from conveyor.runtime.config import Settings, UnknownSettingWarning
from conveyor.runtime.exceptions import (
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from conveyor.runtime.result import AsyncResult, GetTimeout
from conveyor.runtime.sending import SendOptions
from conveyor.runtime.task import Request, Task

__all__ = [
    "App",
    "AsyncResult",
    "GetTimeout",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Reject",
    "Request",
    "Retry",
    "SendOptions",
    "Settings",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "UnknownSettingWarning",
    "WorkerLostError",
]

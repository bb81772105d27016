"""conveyor: one exact contract for task-queue brokers and result backends.

Pick an implementation with a URL, as Celery users do::

    from conveyor import broker_from_url, result_backend_from_url

    broker = broker_from_url("redis://localhost:6379/0")
    results = result_backend_from_url("db+postgresql://localhost/app")
"""

from __future__ import annotations

from conveyor.core import *  # noqa: F403 - the public contract is re-exported verbatim
from conveyor.core import __all__ as _core_all
from conveyor.runtime import App, AsyncResult, Task

__version__ = "0.1.0"
__all__ = [*_core_all, "App", "AsyncResult", "Task", "__version__"]

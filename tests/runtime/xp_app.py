"""Tasks for the cross-process runtime tests (imported by worker subprocesses).

The broker and result backend come from CONVEYOR_BROKER_URL / CONVEYOR_RESULT_BACKEND.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from conveyor import App

app = App("xp", worker_lease_seconds=float(os.environ.get("XP_LEASE_SECONDS", "2")))


@app.task(name="xp.work", bind=True)
def work(self: Any, marker_dir: str, seconds: float) -> int:
    """Leave a marker per execution (to count runs), then work for ``seconds``."""
    marker = Path(marker_dir) / f"{self.request.id}.{uuid.uuid4().hex}"
    marker.write_text(str(os.getpid()))
    time.sleep(seconds)  # the workload itself, not a wait for some other event
    return len(list(Path(marker_dir).glob(f"{self.request.id}.*")))

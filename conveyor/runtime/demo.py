"""``conveyor demo``: the main job on the embedded default, end to end.

Starts a real worker process (``conveyor -A conveyor.runtime.demo worker``) on the SQLite
broker and result store in ``./.conveyor`` (or ``$CONVEYOR_HOME``), sends a batch of tasks
(one of which fails and one of which retries once), shows progress, checks every result, and
prints a summary table: sent, succeeded, failed, retried, throughput, p50/p99 latency.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

import click

from conveyor.runtime.app import App
from conveyor.runtime.check import percentile

__all__ = ["QUEUE", "app", "run_demo"]

QUEUE = "conveyor-demo"

#: The demo's app: no broker configured, so it runs on the embedded SQLite default.
app = App("conveyor.demo", task_default_queue=QUEUE, worker_lease_seconds=10.0)


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="demo.flaky", bind=True, max_retries=3)
def flaky(self: Any) -> int:
    """Fails on its first attempt and retries after 0.2 s; returns how often it retried."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.2, exc=RuntimeError("first attempt fails on purpose"))
    return int(self.request.retries)


def _start_worker(concurrency: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "conveyor.cli",
        "-A",
        "conveyor.runtime.demo",
        "worker",
        "-Q",
        QUEUE,
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-l",
        "warning",
    ]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def _stop_worker(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return int(proc.returncode)


def run_demo(*, count: int = 200, concurrency: int = 4, timeout: float = 120.0) -> bool:
    """Run the demo; return True when every result is what it must be."""
    click.echo(f"broker:  {app.broker_url}\nresults: {app.result_backend_url}")
    app.broker.purge(QUEUE)
    worker = _start_worker(concurrency)
    try:
        return _drive(count, timeout, worker)
    finally:
        code = _stop_worker(worker)
        click.echo(f"worker stopped (exit code {code})")
        app.close()


def _drive(count: int, timeout: float, worker: subprocess.Popen[bytes]) -> bool:
    # Wait until the worker consumes, so the figures measure tasks, not process start-up.
    add.delay(0, 0).get(timeout=min(timeout, 60.0))
    adds = max(1, count - 2)
    sent: dict[str, float] = {}
    expected: dict[str, Any] = {}
    t_start = time.time()
    for i in range(adds):
        res = add.delay(i, i)
        sent[res.id] = time.time()
        expected[res.id] = 2 * i
    failing = fail.delay("this task fails on purpose")
    sent[failing.id] = time.time()
    retrying = flaky.delay()
    sent[retrying.id] = time.time()
    records: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    backend = app.backend
    with click.progressbar(length=len(sent), label="tasks done") as bar:
        while len(records) < len(sent) and time.monotonic() < deadline:
            if worker.poll() is not None:
                click.echo(f"\nworker exited early with code {worker.returncode}", err=True)
                break
            pending = [i for i in sent if i not in records]
            found = backend.fetch_many(pending)
            newly = {i: r for i, r in found.items() if r.ready}
            records.update(newly)
            bar.update(len(newly))
            if len(records) < len(sent):
                time.sleep(0.05)
    t_end = max(
        (r.date_done.timestamp() for r in records.values() if r.date_done), default=time.time()
    )
    ok = True
    wrong = [i for i, v in expected.items() if i in records and records[i].result != v]
    missing = [i for i in sent if i not in records]
    succeeded = sum(1 for r in records.values() if r.state == "SUCCESS")
    failed = sum(1 for r in records.values() if r.state == "FAILURE")
    retried = 1 if records.get(retrying.id) and records[retrying.id].result == 1 else 0
    fail_rec = records.get(failing.id)
    if wrong or missing:
        ok = False
    if (
        fail_rec is None
        or fail_rec.state != "FAILURE"
        or fail_rec.result.get("exc_type") != ("ValueError")
    ):
        ok = False
    if retried != 1:
        ok = False
    latencies = [
        (r.date_done.timestamp() - sent[i]) * 1000.0
        for i, r in records.items()
        if r.date_done is not None and r.date_done.tzinfo is not None
    ]
    elapsed = max(1e-9, t_end - t_start)
    rows = [
        ("sent", f"{len(sent)}"),
        ("succeeded", f"{succeeded}"),
        ("failed (on purpose)", f"{failed}"),
        ("retried (on purpose)", f"{retried}"),
        ("missing", f"{len(missing)}"),
        ("wrong results", f"{len(wrong)}"),
        ("throughput", f"{len(records) / elapsed:.0f} tasks/s"),
        ("latency p50", f"{percentile(latencies, 0.5):.1f} ms"),
        ("latency p99", f"{percentile(latencies, 0.99):.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    click.echo("\n" + "-" * (width + 16))
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value:>12}")
    click.echo("-" * (width + 16))
    click.echo("result: " + ("OK" if ok else "FAILED"))
    click.echo(f"finished at {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    return ok

"""Connections cut, refused and slowed by a TCP proxy between the clients and the server:
consumers resume after every cut, and a publish either succeeds or raises, never vanishes.

The proxy (:class:`faultsupport.TcpProxy`, loopback only) sits between every client of the
scenario (producer, worker, result backend) and the machine's server. While a producer
thread publishes at a steady pace (until the last fault is over, at most ``TOTAL`` tasks:
publishing must outlast the faults, or "the worker resumes" has nothing left to run) and a
CLI worker (threads pool, 4 slots) runs them, the test:

1. cuts every connection (TCP reset, both directions) ``CUTS`` times at random moments;
2. adds ``LATENCY`` seconds to every chunk in both directions for ``LATENCY_PHASE`` s;
3. refuses every new connection for ``REFUSE_PHASE`` s after one more cut (a short outage).

Publishes are not retried: each returned OK or raised. Every publish that returned OK must be
consumed (a SUCCESS result, read directly from the server, not through the proxy); those that
raised are counted (they may or may not have reached the server: at-least-once allows
either). After each cut the worker must start more tasks than it could have held from before
(prefetch 16) within ``RESUME_LIMIT`` seconds, without being restarted.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support.faults import (
    Markers,
    TcpProxy,
    WorkerProcs,
    amqp_shared_lock,
    cleanup_queue,
    record_figures,
    target,
    worker_env,
)

from conveyor.core.errors import ConveyorError
from conveyor.core.types import State
from conveyor.runtime import App
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TOTAL = 3_600  # a cap: the producer stops once the last fault is over (~15-20 s, ~1,000)
RATE = 60.0  # publishes per second
CUTS = 3
LATENCY = 0.05
LATENCY_PHASE = 3.0
REFUSE_PHASE = 2.0
RESUME_LIMIT = 30.0
DEADLINE = 240.0
HELD = 16  # the worker's prefetch limit (4 slots x multiplier 4)


def _through(url: str, server_port: int, proxy_port: int) -> str:
    """``url`` with its server port replaced by the proxy's."""
    needle = f"127.0.0.1:{server_port}"
    assert needle in url, f"fault tests expect loopback URLs: {url}"
    return url.replace(needle, f"127.0.0.1:{proxy_port}")


def _diagnose(
    reader: App, queue: str, ok: dict[int, str], markers: Markers, workers: WorkerProcs
) -> str:
    """Where the unconsumed acknowledged publishes are: never run, ran without a result."""
    records = reader.backend.fetch_many(list(ok.values()))
    runs = markers.counts()
    missing = {n: i for n, i in ok.items() if i not in records}
    not_run = sorted(n for n, i in missing.items() if not runs[i])
    ran = sorted(n for n, i in missing.items() if runs[i])
    broker = reader.broker
    sizes = {}
    for q in (queue, broker.dead_letter_queue(queue)):
        try:
            sizes[q] = broker.size(q)
        except ConveyorError as exc:
            sizes[q] = str(exc)
    tail = "\n".join(workers.logs().splitlines()[-40:])
    return (
        f"{len(missing)} acknowledged publishes without a result: never ran {not_run[:20]} "
        f"(of {len(not_run)}), ran but no result {ran[:20]} (of {len(ran)}); queue sizes "
        f"{sizes}; worker log tail:\n{tail}"
    )


@pytest.mark.parametrize("name", ["redis", "postgres", "amqp"])
def test_cuts_refusals_and_latency_lose_no_acknowledged_publish(name: str, tmp_path: Path) -> None:
    where = target(name, tmp_path)
    server_port = where.ports[0]
    rng = random.Random()
    queue = unique_name(f"net-{name}")
    markers = Markers(tmp_path / "markers")
    with amqp_shared_lock(name), TcpProxy(server_port) as proxy:
        broker = _through(where.broker, server_port, proxy.port)
        # Results go through the proxy too where they live on the same server.
        backend = (
            _through(where.backend, server_port, proxy.port)
            if f":{server_port}/" in where.backend
            else where.backend
        )
        producer = App("net-producer", broker=broker, backend=backend)
        reader = App("net-reader", broker=where.broker, backend=where.backend)  # direct
        workers = WorkerProcs(worker_env(broker, backend, markers.folder), tmp_path)
        ok: dict[int, str] = {}
        raised: Counter[str] = Counter()
        began = time.monotonic()
        stop = threading.Event()
        phase = ["before"]  # which fault is on, for the publish errors' breakdown
        attempted = [0]  # publishes started; each must end OK or raised

        def produce() -> None:
            for n in range(TOTAL):
                if stop.is_set():
                    return
                pause = began + n / RATE - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing
                attempted[0] += 1
                try:
                    ok[n] = producer.send_task("faults.work", (n,), queue=queue).id
                except ConveyorError as exc:  # raised: counted, never silently dropped
                    raised[f"{phase[0]}: {type(exc).__name__}"] += 1

        thread = threading.Thread(target=produce, name="net-producer")
        resumes: list[float] = []
        try:
            reader.broker.declare_queue(queue)
            workers.start(pool="threads", concurrency=4, extra=("-Q", queue))
            thread.start()
            eventually(lambda: markers.counts(), 60, message="the worker runs tasks")

            def resumed_after(at: float) -> None:
                base = sum(markers.counts().values())
                eventually(
                    lambda: sum(markers.counts().values()) > base + HELD, RESUME_LIMIT,
                    interval=0.05, message="the worker claims and runs tasks after the fault",
                )  # fmt: skip
                resumes.append(time.monotonic() - at)

            for _ in range(CUTS):
                time.sleep(rng.uniform(0.5, 1.5))  # a random moment to cut at
                phase[0] = "cut"
                proxy.cut()
                resumed_after(time.monotonic())
                phase[0] = "after cut"
            phase[0] = "latency"
            proxy.latency = LATENCY
            time.sleep(LATENCY_PHASE)  # the latency phase itself
            proxy.latency = 0.0
            phase[0] = "refused"
            proxy.refuse = True
            proxy.cut()
            time.sleep(REFUSE_PHASE)  # the outage itself
            proxy.refuse = False
            phase[0] = "after refusal"
            resumed_after(time.monotonic())
            phase[0] = "after all faults"
            stop.set()
            thread.join(DEADLINE)
            acknowledged = dict(ok)

            def all_consumed() -> bool:
                records = reader.backend.fetch_many(list(acknowledged.values()))
                return len(records) == len(acknowledged) and all(
                    r.state == State.SUCCESS for r in records.values()
                )

            try:
                eventually(
                    all_consumed, DEADLINE, interval=0.2, max_interval=1.0,
                    message="every acknowledged publish consumed",
                )  # fmt: skip
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\n{_diagnose(reader, queue, ok, markers, workers)}"
                ) from None
            elapsed = time.monotonic() - began
            runs = markers.counts()
            alive = workers.procs[0].poll() is None
        finally:
            stop.set()
            thread.join(30.0)
            workers.stop_all()
            producer.close()
            reader.close()
            cleanup_queue(where.broker, queue)
        cuts, connections = proxy.cuts, proxy.accepted
    consumed = sum(1 for i in acknowledged.values() if runs[i])
    duplicates = sum(runs.values()) - len(runs)
    record_figures(
        f"network/{name}",
        kind="network",
        broker=name,
        tasks=attempted[0],
        cuts=cuts,
        connections=connections,
        latency_ms=int(LATENCY * 1000),
        refused_seconds=REFUSE_PHASE,
        moved=len(acknowledged),
        publish_raised=sum(raised.values()),
        publish_errors=dict(raised),
        lost=len(acknowledged) - consumed,
        duplicated=duplicates,
        resume_seconds=[round(r, 2) for r in resumes],
        seconds=round(elapsed, 1),
    )
    assert alive, "the worker died instead of reconnecting"
    assert consumed == len(acknowledged)
    assert len(acknowledged) + sum(raised.values()) == attempted[0]
    assert cuts >= CUTS + 1

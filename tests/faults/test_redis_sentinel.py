"""Sentinel failover: a producer and a worker on ``sentinel://`` lose no message when the
master dies and a replica is promoted.

The test starts its own master, replica and sentinel (Debian's ``redis-server`` and
``redis-sentinel``) on free loopback ports, without persistence. Phase 1 publishes while the
worker consumes; the master is SIGKILLed once the replica has caught up with phase 1's
publishes (replication is asynchronous: a write the dead master never shipped is lost to any
client; that is Redis's guarantee, not the broker's), in the middle of the worker's claims,
acks and result writes. Phase 2 publishes through the failover, retrying until the new master
answers. Every task of both phases must then have a SUCCESS result; duplicates (a claim or
ack the dead master did not ship) are allowed by at-least-once and reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel
from support.redis import free_port, redis_server_binary, terminating, wait_for_port

from conveyor.core.errors import OperationalError
from conveyor.core.types import State
from conveyor.runtime import App
from conveyor.testing.support import eventually, service_unavailable, unique_name

MASTER = "mymaster"
PHASE = 60  # tasks per phase


@dataclass
class Cluster:
    master_port: int
    replica_port: int
    sentinel_port: int
    master: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/0"


def _server(binary: str, port: int, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(folder), *extra]  # fmt: skip
    log = (folder / f"{port}.log").open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    server_bin = redis_server_binary("redis-server")
    sentinel_bin = redis_server_binary("redis-sentinel")
    if server_bin is None or sentinel_bin is None:
        service_unavailable(
            "Redis Sentinel", "sentinel://", "redis-server/redis-sentinel not installed "
            "(apt-get install -y redis-server redis-sentinel)"
        )  # fmt: skip
    ports = [free_port(), free_port(), free_port()]
    while len(set(ports)) < 3:
        ports = [free_port(), free_port(), free_port()]
    mport, rport, sport = ports
    master = _server(server_bin, mport, tmp_path)
    replica = _server(server_bin, rport, tmp_path, "--replicaof", "127.0.0.1", str(mport))
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {mport} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
        f"sentinel parallel-syncs {MASTER} 1\n"
    )
    sentinel = subprocess.Popen(
        [sentinel_bin, str(conf)],
        stdout=(tmp_path / "sentinel.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    with terminating(master), terminating(replica), terminating(sentinel):
        for port in ports:
            wait_for_port(port)
        probe = redis.Redis(port=sport, socket_timeout=2)
        eventually(
            lambda: any(
                r.get("master-link-status") == "ok"
                for r in probe.sentinel_slaves(MASTER)  # type: ignore[no-untyped-call]
            ),
            30,
            message="sentinel sees a synced replica",
        )
        probe.close()
        yield Cluster(mport, rport, sport, master)


def _make_app(url: str, key: str) -> App:
    app = App(
        "sentinel",
        broker=url,
        backend=url,
        broker_transport_options={"master_name": MASTER, "max_retries": 5},
        result_backend_transport_options={"master_name": MASTER, "max_retries": 5},
        worker_lease_seconds=3.0,
    )
    counter = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))], socket_timeout=2
    )

    @app.task(name="sentinel.job")
    def job(n: int) -> int:
        with contextlib.suppress(redis.RedisError):
            counter.master_for(MASTER, socket_timeout=2).hincrby(key, str(n), 1)
        time.sleep(0.01)
        return n

    return app


def _publish(app: App, queue: str, n: int, deadline: float) -> str:
    """Publish task ``n``, retrying through the failover; return its task id."""
    task_id = f"{queue}-{n}"
    while True:
        try:
            app.send_task("sentinel.job", (n,), queue=queue, task_id=task_id)
            return task_id
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_failover_loses_no_message(cluster: Cluster) -> None:
    start = time.monotonic()
    deadline = start + 80.0
    queue = unique_name("sentinel")
    key = f"{queue}-runs"
    producer = _make_app(cluster.url, key)
    consumer = _make_app(cluster.url, key)
    worker = consumer.Worker(queues=[queue], pool="threads", concurrency=4, prefetch_multiplier=2)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert worker.wait_started(15)
    ids: list[str] = []
    try:
        for n in range(PHASE):
            ids.append(_publish(producer, queue, n, deadline))
            time.sleep(0.01)
        # The replica has everything the producer was told is published.
        old = redis.Redis(port=cluster.master_port, socket_timeout=2)
        replica = redis.Redis(port=cluster.replica_port, socket_timeout=2)
        target = old.info("replication")["master_repl_offset"]
        eventually(
            lambda: replica.info("replication")["slave_repl_offset"] >= target,
            10,
            message="replica caught up",
        )
        os.kill(cluster.master.pid, signal.SIGKILL)  # mid-consumption
        cluster.master.wait(10)
        killed_at = time.monotonic()
        for n in range(PHASE, 2 * PHASE):
            ids.append(_publish(producer, queue, n, deadline))
        failover_s = time.monotonic() - killed_at

        def all_done() -> bool:
            found = producer.backend.fetch_many(ids)
            return len(found) == len(ids) and all(r.state is State.SUCCESS for r in found.values())

        eventually(all_done, max(5.0, deadline - time.monotonic()), message="all results")
    finally:
        worker.stop()
        thread.join(20)
        producer.close()
        consumer.close()
    new_master = redis.Redis(port=cluster.replica_port, socket_timeout=2)
    runs: dict[Any, Any] = new_master.hgetall(key)
    duplicates = sum(int(v) - 1 for v in runs.values())
    elapsed = time.monotonic() - start
    print(
        f"\nSentinel failover: {len(ids)} tasks, all {len(ids)} SUCCESS; master SIGKILLed "
        f"after {PHASE}, producer blocked {failover_s:.1f}s until the promoted replica "
        f"answered; {duplicates} duplicate executions (at-least-once); {elapsed:.1f}s total"
    )
    assert new_master.info("replication")["role"] == "master"
    assert elapsed < 90

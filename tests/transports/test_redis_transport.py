"""RedisBroker behaviour beyond the conformance suite: kombu's layout, URLs, reconnects.

Most tests use the shared test server (``CONVEYOR_TEST_REDIS_URL``); the reconnect, READONLY
and Unix-socket tests start private ``redis-server`` processes on free loopback ports.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.utils.json import loads
from support.redis import (
    REDIS_URL,
    closed_port_url,
    delete_keys,
    free_port,
    require_redis,
    run_thread_waves,
    terminating,
    wait_for_port,
)

from conveyor._drivers.redis import parse_redis_url
from conveyor.core.errors import ConfigurationError, ConnectionLost, InvalidURL
from conveyor.core.registry import broker_from_url
from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.redis import RedisBroker


@pytest.fixture
def server() -> Iterator[redis.Redis]:
    client = require_redis(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def queue(server: redis.Redis) -> Iterator[str]:
    name = unique_name("redis-broker")
    yield name
    delete_keys(server, f"*{name}*")


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    b = RedisBroker.from_url(REDIS_URL)
    yield b
    b.close()


def _env(**fields: object) -> Envelope:
    return Envelope(id=unique_name("m"), body=b"{}", **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- URLs


def test_the_registry_serves_every_redis_scheme() -> None:
    for url in ("redis://h:1/2", "rediss://h/0", "redis+socket:///tmp/r.sock"):
        b = broker_from_url(url)
        assert isinstance(b, RedisBroker)
        b.close()
    with pytest.raises(ConfigurationError, match="master_name"):
        broker_from_url("sentinel://h1:26379;sentinel://h2:26379")
    b = broker_from_url("sentinel://h1:26379;sentinel://h2:26380/3", master_name="m")
    b.close()


def test_urls_parse_like_kombus() -> None:
    target, query = parse_redis_url("redis://user:p%40ss@example:6380/4?lease_seconds=5")
    assert (target.db, target.kwargs["host"], target.kwargs["port"]) == (4, "example", 6380)
    assert (target.kwargs["username"], target.kwargs["password"]) == ("user", "p@ss")
    assert query == {"lease_seconds": "5"}
    target, _ = parse_redis_url("redis+socket:///var/run/redis.sock?virtual_host=7")
    assert (target.kwargs["unix_socket_path"], target.db) == ("/var/run/redis.sock", 7)
    target, _ = parse_redis_url("sentinel://:pw@h1:26379;sentinel://h2/2")
    assert target.sentinels == (("h1", 26379), ("h2", 26379))
    assert (target.db, target.kwargs["password"]) == (2, "pw")
    with pytest.raises(InvalidURL):
        parse_redis_url("redis://h/notanumber")


def test_bad_options_fail_loudly_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        RedisBroker.from_url("redis://h/0?lease_second=5")
    with pytest.raises(ConfigurationError, match="rediss://"):
        RedisBroker.from_url("redis://h/0?ssl_cert_reqs=required")
    with pytest.raises(ConfigurationError, match="priority_steps"):
        RedisBroker.from_url("redis://h/0", priority_steps="3,6,9")
    b = RedisBroker.from_url("rediss://h/0?ssl_cert_reqs=CERT_NONE")
    kwargs = b.client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "none"
    b.close()


def test_passwords_never_show_in_repr_or_errors() -> None:
    url = closed_port_url().replace("redis://", "redis://:s3cr3t-pw@")
    b = RedisBroker.from_url(url, max_retries=0)
    assert "s3cr3t-pw" not in repr(b)
    with pytest.raises(ConnectionLost) as info:
        b.publish(_env(), queue="q")
    assert "s3cr3t-pw" not in str(info.value)
    b.close()


# ---------------------------------------------------------------------------- layout


def test_kombus_default_steps_give_four_levels_highest_conveyor_priority_first(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    sent = {p: _env(priority=p) for p in range(10)}
    for p in (0, 5, 9, 1, 3, 7, 2, 8, 4, 6):
        broker.publish(sent[p], queue=queue)
    # conveyor p -> kombu 9 - p -> greatest step of 0,3,6,9 not above it
    sizes = {k: server.llen(k) for k in (queue, f"{queue}\x06\x163", f"{queue}\x06\x166")}
    assert sizes == {queue: 3, f"{queue}\x06\x163": 3, f"{queue}\x06\x166": 3}
    assert server.llen(f"{queue}\x06\x169") == 1
    got = broker.receive(queue, max_messages=10, timeout=1)
    levels = [d.envelope.priority for d in got]
    assert [sorted(levels[i : i + 3]) for i in (0, 3, 6)] == [[7, 8, 9], [4, 5, 6], [1, 2, 3]]
    assert levels[9] == 0
    for delivery in got:
        broker.ack(delivery)


def test_global_keyprefix_applies_to_keys_and_never_to_values(server: redis.Redis) -> None:
    queue = unique_name("prefixed")
    b = RedisBroker.from_url(REDIS_URL, global_keyprefix="pfx:")
    try:
        b.declare_queue(queue)
        b.publish(_env(priority=9), queue=queue)
        assert server.smembers(f"pfx:_kombu.binding.{queue}") == {
            f"{queue}\x06\x16\x06\x16{queue}".encode()
        }
        [raw] = server.lrange(f"pfx:{queue}", 0, -1)
        assert loads(raw)["properties"]["delivery_info"]["routing_key"] == queue
        [got] = b.receive(queue, timeout=1)
        assert server.hlen(f"pfx:conveyor:{{{queue}}}:leases") == 1
        b.ack(got)
    finally:
        b.close()
        delete_keys(server, f"pfx:*{queue}*")


def test_redelivery_marks_are_kombus_and_keep_the_envelope_intact(
    server: redis.Redis, queue: str
) -> None:
    headers = {"task": "t", "id": "x", "big": 2**53 + 1, "empty": [], "map": {}, "n": None}
    sent = Envelope(id="x", body=b"\x00\xff", headers=headers, correlation_id="x")
    consumer = RedisBroker.from_url(REDIS_URL, lease_seconds=0.2)
    try:
        consumer.publish(sent, queue=queue)
        for expected_count in (1, 2, 3):
            [held] = consumer.receive(queue, timeout=1)
            assert held.delivery_count == expected_count
            assert held.envelope == sent  # marks removed, big ints and [] untouched

            def restored() -> bool:
                consumer._claim([queue], 0)  # a claim of nothing still reclaims
                return server.llen(f"{queue}\x06\x169") == 1

            # Once the lease expired a claim restores it: peek at what a Celery worker reads.
            eventually(restored, 5)
            raw = loads(server.lindex(f"{queue}\x06\x169", 0))
            assert raw["headers"]["redelivered"] is True
            assert raw["headers"]["x-delivery-count"] == expected_count
            assert raw["properties"]["delivery_info"]["redelivered"] is True
            assert raw["headers"]["big"] == 2**53 + 1
            assert raw["headers"]["empty"] == []
        [last] = consumer.receive(queue, timeout=1)
        assert last.redelivered
        assert last.delivery_count == 4
        consumer.ack(last)
    finally:
        consumer.close()


def test_a_message_kombu_restored_is_read_as_redelivered(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    restored = (
        '{"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": '
        '"application/json", "headers": {"task": "t", "id": "k1", "redelivered": true}, '
        '"properties": {"correlation_id": "k1", "delivery_mode": 2, "delivery_info": '
        '{"exchange": "", "routing_key": "q", "redelivered": true}, "priority": 0, '
        '"body_encoding": "base64", "delivery_tag": "3c6e0a4e-1a0a-4d4e-9b1e-6f0c1d2e3f40"}}'
    )
    server.lpush(queue, restored)
    [got] = broker.receive(queue, timeout=1)
    assert got.redelivered is True
    assert got.delivery_count is None  # kombu does not count
    assert got.envelope.id == "k1"
    assert got.envelope.priority == 9
    assert dict(got.envelope.headers) == {"task": "t", "id": "k1"}
    broker.ack(got)


def test_an_undecodable_message_is_dead_lettered_not_returned(
    broker: RedisBroker, server: redis.Redis, queue: str
) -> None:
    server.lpush(queue, b"\xffnot json")
    good = _env(priority=9)
    broker.publish(good, queue=queue)
    got = broker.receive(queue, max_messages=5, timeout=1)
    assert [d.envelope.id for d in got] == [good.id]
    # Kept, byte for byte, as the body of a readable stand-in that says why (issue 13).
    [dead] = broker.receive(broker.dead_letter_queue(queue), timeout=1)
    assert dead.envelope.body == b"\xffnot json"
    assert dead.envelope.content_type == "application/x-conveyor-undecodable"
    assert "undecodable" in dead.envelope.headers["x-conveyor-dead-letter-reason"]
    broker.ack(dead)
    broker.ack(got[0])


def test_a_producer_wakes_a_blocked_consumer_at_once(broker: RedisBroker, queue: str) -> None:
    slow_poll = RedisBroker.from_url(REDIS_URL, poll_interval=30.0)
    try:
        import threading

        timer = threading.Timer(0.2, broker.publish, (_env(),), {"queue": queue})
        start = time.monotonic()
        timer.start()
        got = slow_poll.receive(queue, timeout=10)
        timer.join()
        assert len(got) == 1
        assert time.monotonic() - start < 1.0
        slow_poll.ack(got[0])
    finally:
        slow_poll.close()


# ---------------------------------------------------------------------------- servers


def _start(binary: str, port: int, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), *extra]
    proc = subprocess.Popen(
        argv, stdout=(folder / f"{port}.log").open("ab"), stderr=subprocess.STDOUT
    )
    wait_for_port(port)
    return proc


def test_held_and_ready_messages_survive_a_server_restart(redis_bin: str, tmp_path: Path) -> None:
    port = free_port()
    persist = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    proc = _start(redis_bin, port, tmp_path, *persist)
    url = f"redis://127.0.0.1:{port}/0"
    broker = RedisBroker.from_url(url, max_retries=8, retry_backoff_cap=0.5)
    try:
        with terminating(proc):
            broker.publish_many([_env() for _ in range(3)], queue="q")
            held = broker.receive("q", max_messages=2, timeout=1)
            assert len(held) == 2
            proc.terminate()
            proc.wait(10)
        proc = _start(redis_bin, port, tmp_path, *persist)
        with terminating(proc):
            for delivery in held:  # the same connection pool reconnects
                broker.ack(delivery)
            [rest] = broker.receive("q", timeout=1)
            broker.ack(rest)
            assert broker.receive("q", timeout=0.2) == []
    finally:
        broker.close()


def test_killed_connections_are_reopened_transparently(server: redis.Redis, queue: str) -> None:
    name = unique_name("victim")
    broker = RedisBroker.from_url(REDIS_URL, client_name=name)
    try:
        broker.publish(_env(), queue=queue)
        for client in server.client_list():
            if client.get("name") == name:
                server.client_kill_filter(_id=client["id"])
        [got] = broker.receive(queue, timeout=1)
        broker.ack(got)
    finally:
        broker.close()


def test_an_emptied_script_cache_is_refilled_on_the_next_command(
    server: redis.Redis, broker: RedisBroker, queue: str
) -> None:
    broker.publish(_env(), queue=queue)
    server.script_flush()  # what a restarted server or a new master looks like
    broker.publish(_env(), queue=queue)
    got = broker.receive(queue, max_messages=2, timeout=1)
    assert len(got) == 2
    server.script_flush()
    for delivery in got:
        broker.ack(delivery)
    assert broker.size(queue) == 0


def test_a_forked_child_never_writes_on_its_parents_connection(
    broker: RedisBroker, queue: str
) -> None:
    import os

    broker.publish(_env(), queue=queue)  # the parent now holds a connection
    pid = os.fork()
    if pid == 0:  # the child: publish on its own connection, then leave without cleanup
        code = 1
        try:
            broker.publish(_env(), queue=queue)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    broker.publish(_env(), queue=queue)  # the parent's connection still in step
    assert broker.size(queue) == 3


def test_close_hands_held_connections_back_to_a_borrowed_client(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    broker = RedisBroker(client, url=REDIS_URL)
    import threading

    threads = [
        threading.Thread(target=broker.publish, args=(_env(),), kwargs={"queue": queue})
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    in_use = len(client.connection_pool._in_use_connections)
    assert in_use >= 4  # one per publishing thread (plus the caller's)
    broker.close()
    assert len(client.connection_pool._in_use_connections) == 0
    assert client.llen(queue + "\x06\x169") == 4  # the client itself still works
    client.close()


def test_threads_that_end_give_their_connections_back(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    broker = RedisBroker(client, url=REDIS_URL)
    try:
        run_thread_waves(lambda: broker.publish(_env(), queue=queue), waves=5, per_wave=8)
        pool = client.connection_pool
        assert len(pool._in_use_connections) == 0
        assert len(pool._available_connections) <= 8  # reused, never 40
        assert broker.size(queue) == 40
    finally:
        broker.close()
        client.close()


def test_a_read_only_replica_is_a_connection_error(redis_bin: str, tmp_path: Path) -> None:
    master_port, replica_port = free_port(), free_port()
    master = _start(redis_bin, master_port, tmp_path, "--save", "")
    with terminating(master):
        replica = _start(
            redis_bin, replica_port, tmp_path, "--save", "", "--replicaof", "127.0.0.1",
            str(master_port),
        )  # fmt: skip
        with terminating(replica):
            broker = RedisBroker.from_url(
                f"redis://127.0.0.1:{replica_port}/0", max_retries=1, retry_backoff_cap=0.05
            )
            try:
                with pytest.raises(ConnectionLost, match=r"(?i)read.?only"):
                    broker.publish(_env(), queue="q")
            finally:
                broker.close()


def test_a_unix_socket_url_works(redis_bin: str, tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = _start(redis_bin, free_port(), tmp_path, "--unixsocket", str(sock), "--save", "")
    with terminating(proc):
        eventually(sock.exists, 5)
        broker = RedisBroker.from_url(f"redis+socket://{sock}?virtual_host=3")
        try:
            broker.publish(_env(), queue="q")
            [got] = broker.receive("q", timeout=1)
            broker.ack(got)
            assert redis.Redis(unix_socket_path=str(sock), db=3).exists("_kombu.binding.q") == 0
        finally:
            broker.close()

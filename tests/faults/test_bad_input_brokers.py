"""Bad messages on every real broker: dead-lettered (kept in the broker's dead-letter queue;
a refused one writes no result, an unknown task a FAILURE), the worker keeps running, and
the good messages around them all run.

The full catalogue and the fuzzing run on the memory broker (tests/runtime/test_bad_input.py);
this is the cheap cross-check that each transport carries a bad message to the worker and its
dead-letter queue intact (binary bodies, odd content types, huge bodies).
"""

from __future__ import annotations

import json
import pickle
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.faults import amqp_shared_lock, cleanup_queue, record_figures, target

from conveyor import App, Envelope
from conveyor.core.capabilities import Capability
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_SIZE = 64 * 1024
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _bad(task: str) -> list[tuple[str, bytes, str, dict[str, Any]]]:
    good_body = json.dumps([[1], {}, EMBED]).encode()
    return [
        ("random-bytes", bytes(range(256)) * 3, "application/json", {}),
        ("truncated-json", good_body[:-5], "application/json", {}),
        ("two-item-body", b"[[1], {}]", "application/json", {}),
        ("pickle", pickle.dumps(((1,), {}, {})), "application/x-python-serialize", {}),
        ("unknown-content-type", good_body, "application/xml", {}),
        ("huge", b"[[" + b'"x",' * (MAX_SIZE // 2) + b'"x"], {}, {}]', "application/json", {}),
        ("unknown-task", good_body, "application/json", {"task": f"{task}.nobody"}),
    ]


@pytest.mark.parametrize("name", ["redis", "amqp", "postgres", "sqlite", "mysql", "mongodb"])
def test_bad_messages_are_dead_lettered_on_every_broker(name: str, tmp_path: Path) -> None:
    where = target(name, tmp_path)
    queue = unique_name(f"bad-{name}")
    app = App(
        "bad-brokers", broker=where.broker, backend=where.backend,
        worker_max_message_size=MAX_SIZE, worker_lease_seconds=30.0,
    )  # fmt: skip

    @app.task(name="badb.ok")
    def ok(n: int) -> int:
        return n

    bad = _bad("badb")
    with amqp_shared_lock(name):
        try:
            broker = app.broker
            broker.declare_queue(queue)
            good = []
            ids = []
            for i, (kind, body, content_type, extra) in enumerate(bad):
                good.append(ok.apply_async((i,), queue=queue))
                task_id = f"{kind}-{uuid.uuid4().hex[:8]}"
                headers = {"lang": "py", "task": "badb.ok", "id": task_id, **extra}
                broker.publish(
                    Envelope(id=task_id, body=body, content_type=content_type, headers=headers),
                    queue=queue,
                )
                ids.append(task_id)
            good.append(ok.apply_async((len(bad),), queue=queue))
            worker = app.Worker(queues=[queue], pool="threads", concurrency=2, receive_timeout=0.2)
            thread = threading.Thread(target=worker.start, daemon=True)
            thread.start()
            try:
                assert worker.wait_started(30)
                assert sorted(r.get(timeout=120) for r in good) == list(range(len(bad) + 1))
                # >=: on a very slow server a lease can lapse before the dead-lettering
                # settles; the message then comes back and is dead-lettered again (the broker
                # keeps one copy: the dead-letter queue size is checked below).
                eventually(
                    lambda: worker.stats["dead_lettered"] >= len(bad), 60,
                    message="every bad message dead-lettered",
                )  # fmt: skip
                assert thread.is_alive()
                states = {i: app.AsyncResult(i).state for i in ids}
                expected = {
                    i: "FAILURE" if i.startswith("unknown-task") else "PENDING" for i in ids
                }
                assert states == expected
                caps = type(broker).capabilities
                if Capability.QUEUE_SIZE in caps and Capability.DEAD_LETTER in caps:
                    dlq = broker.dead_letter_queue(queue)
                    eventually(
                        lambda: broker.size(dlq) == len(bad), 30,
                        message="the dead letters are kept in the broker",
                    )  # fmt: skip
                    assert broker.size(queue) == 0
            finally:
                worker.stop()
                thread.join(30)
        finally:
            app.close()
            cleanup_queue(where.broker, queue)
    record_figures(
        f"bad-input/{name}", kind="bad-input", broker=name, bad_inputs=len(bad),
        moved=len(good), lost=0, dead_lettered=len(bad), duplicated=0,
    )  # fmt: skip

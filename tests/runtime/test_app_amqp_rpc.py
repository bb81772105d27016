"""The runtime on RabbitMQ with rpc:// results, configured as a Celery user would: URLs only.

App wires the rpc backend to its broker and reply queue (oid) by itself, and declares the
reply queue before the first task is sent, so a reply that arrives before ``get()`` is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from support.amqp import QueueJanitor, amqp_url, janitor  # noqa: F401 - fixtures

from conveyor import App
from conveyor.testing.support import unique_name


@pytest.fixture
def rpc_app(janitor: QueueJanitor) -> Iterator[App]:  # noqa: F811 - fixture
    queue = unique_name("rt-rpc")
    app = App("rt_rpc", broker=janitor.url, backend="rpc://", task_default_queue=queue)
    janitor.queues.update({queue, app.oid})
    yield app
    app.close()


def test_results_come_back_over_rpc_with_urls_only(rpc_app: App) -> None:
    @rpc_app.task(name="rt_rpc.add")
    def add(x: int, y: int) -> int:
        return x + y

    @rpc_app.task(name="rt_rpc.boom")
    def boom() -> None:
        raise ValueError("over rpc")

    # Send before any worker runs: the replies must wait in the declared reply queue.
    results = [add.delay(i, i) for i in range(5)]
    failing = boom.delay()
    worker = rpc_app.Worker(pool="threads", concurrency=2, receive_timeout=0.2)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert [r.get(timeout=30) for r in results] == [0, 2, 4, 6, 8]
        with pytest.raises(ValueError, match="over rpc"):
            failing.get(timeout=30)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()

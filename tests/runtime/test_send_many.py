"""``App.send_many``: one broker batch for many task messages, each with its own id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conveyor import App
from conveyor.core.errors import ConfigurationError


def test_send_many_publishes_one_message_per_item_in_order(app: App) -> None:
    results = app.send_many("rt.add", [(i, i) for i in range(5)], queue="batch")
    assert len({r.id for r in results}) == 5
    deliveries = app.broker.receive("batch", max_messages=10, timeout=1.0)
    assert [d.envelope.id for d in deliveries] == [r.id for r in results]
    for delivery in deliveries:
        app.broker.ack(delivery)


def test_send_many_uses_the_brokers_batch_publish(app: App, monkeypatch: Any) -> None:
    calls: list[int] = []
    original = app.broker.publish_many

    def spy(envelopes: Any, **kwargs: Any) -> int:
        batch = list(envelopes)
        calls.append(len(batch))
        return int(original(batch, **kwargs))

    monkeypatch.setattr(app.broker, "publish_many", spy)
    app.send_many("rt.add", [(i, i) for i in range(2500)], queue="big")
    assert calls == [1000, 1000, 500]
    assert app.broker.purge("big") == 2500


def test_send_many_results_are_awaitable(app: App, run_worker: Callable[..., Any]) -> None:
    @app.task(name="rt.double")
    def double(x: int) -> int:
        return 2 * x

    run_worker()
    results = app.send_many("rt.double", [(i,) for i in range(10)])
    assert [r.get(timeout=10) for r in results] == [2 * i for i in range(10)]


def test_send_many_refuses_a_shared_task_id(app: App) -> None:
    with pytest.raises(ConfigurationError):
        app.send_many("rt.add", [(1, 1)], task_id="same")

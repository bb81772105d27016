"""Ids and text a store cannot hold, at publish and on the worker's own publishes (issue 13,
classes 1 and 4): refused with a typed, non-transient error (``ConfigurationError`` or
``EncodeError``), never a raw driver exception and never an ``OperationalError`` (which
callers retry: the App's publish retry, the worker's give-back).

Counts asserted: a task whose retry the broker refuses runs once (its FAILURE says why); a
task id the result backend refuses is refused at ``apply_async``, before anything is
published.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hostile_support import (
    BACKENDS,
    Planter,
    Runs,
    backend_place,
    celery_envelope,
    cleanup,
    figures,
    hostile_app,
    place,
    running,
    server_lock,
    settled,
)

from conveyor import Envelope
from conveyor.core.errors import ConfigurationError, OperationalError, SerializationError
from conveyor.testing.support import eventually, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _encode_params() -> list[Any]:
    out = []
    for name in ["sqlite", "postgres", "mysql", "redis", "amqp", "mongodb"]:
        out.append(pytest.param(name, id=name))
    return out


ODD_ENVELOPES = {
    "header-id": lambda: celery_envelope("h.count", "\ud800-x"),
    "envelope-id": lambda: Envelope(id="\ud800-y", body=b"{}"),
    "correlation-id": lambda: Envelope(id="z", body=b"{}", correlation_id="\udfff"),
    "header-value": lambda: Envelope(id="w", body=b"{}", headers={"k": "a\udfffb"}),
}


@pytest.mark.parametrize("broker", _encode_params())
def test_text_utf8_cannot_encode_is_refused_at_publish_with_a_typed_error_or_carried_exactly(
    broker: str, tmp_path: Path
) -> None:
    """Redis carries it (JSON escapes), AMQP refuses it with EncodeError; either is right,
    a raw UnicodeEncodeError is not."""
    where = place(broker, tmp_path)
    queue = unique_name("enc")
    app, _ = hostile_app(where, Runs(tmp_path / "runs"))
    outcomes: dict[str, str] = {}
    with server_lock(where):
        try:
            app.broker.declare_queue(queue)
            for kind, make in ODD_ENVELOPES.items():
                try:
                    app.broker.publish(make(), queue=queue)
                    outcomes[kind] = "carried"
                except (ConfigurationError, SerializationError):
                    outcomes[kind] = "refused"
                except OperationalError as exc:
                    outcomes[kind] = f"transient?! {exc}"
                except Exception as exc:
                    outcomes[kind] = f"untyped {type(exc).__name__}"
        finally:
            app.close()
            cleanup(where, queue)
    figures("1-publish-encoding", broker, bad_inputs=len(ODD_ENVELOPES), outcomes=outcomes)
    assert set(outcomes.values()) <= {"carried", "refused"}, outcomes


#: Ids some broker cannot hold: each must travel exactly or be refused non-transiently.
HARD_IDS = {
    "nul-envelope-id": lambda: Envelope(id="a\x00b", body=b"{}"),
    "nul-correlation-id": lambda: Envelope(id="c", body=b"{}", correlation_id="d\x00"),
    "70k-envelope-id": lambda: Envelope(id="i" * 70_000, body=b"{}"),
    "10mb-correlation-id": lambda: Envelope(id="c", body=b"{}", correlation_id="c" * (10 << 20)),
}


@pytest.mark.parametrize(
    "broker",
    [
        "sqlite",
        "postgres",
        "mysql",
        "redis",
        "amqp",
        "mongodb",
    ],
)
def test_an_id_the_broker_cannot_hold_is_carried_or_refused_never_called_transient(
    broker: str, tmp_path: Path
) -> None:
    where = place(broker, tmp_path)
    queue = unique_name("hard-ids")
    app, _ = hostile_app(where, Runs(tmp_path / "runs"))
    outcomes: dict[str, str] = {}
    with server_lock(where):
        try:
            app.broker.declare_queue(queue)
            for kind, make in HARD_IDS.items():
                envelope = make()
                try:
                    app.broker.publish(envelope, queue=queue)
                except (ConfigurationError, SerializationError):
                    outcomes[kind] = "refused"
                    continue
                except OperationalError as exc:
                    outcomes[kind] = f"{type(exc).__name__}: {str(exc)[-80:]}"
                    continue
                got = app.broker.receive(queue, timeout=10)
                assert len(got) == 1, kind
                same = (got[0].envelope.id, got[0].envelope.correlation_id) == (
                    envelope.id,
                    envelope.correlation_id,
                )
                outcomes[kind] = "carried" if same else "altered"
                app.broker.ack(got[0])
        finally:
            app.close()
            cleanup(where, queue)
    figures("1-hard-ids", broker, bad_inputs=len(HARD_IDS), outcomes=outcomes)
    assert set(outcomes.values()) <= {"carried", "refused"}, outcomes


ODD_TASK_IDS = {"nul": lambda: f"nul\x00{unique_name()}", "70k": lambda: "k" * 70_000}
RETRY_CASES = [
    pytest.param("sqlite", "nul", id="sqlite-nul"),
    pytest.param("postgres", "nul", id="postgres-nul"),
    pytest.param("mysql", "70k", id="mysql-70k"),
    pytest.param("mongodb", "nul", id="mongodb-nul"),
    pytest.param("redis", "70k", id="redis-70k"),
    pytest.param("amqp", "70k", id="amqp-70k"),
]


@pytest.mark.parametrize(("broker", "kind"), RETRY_CASES)
def test_a_retry_the_broker_cannot_publish_fails_the_task_once_instead_of_looping(
    broker: str, kind: str, tmp_path: Path
) -> None:
    """A Celery client's message whose task id holds NUL (JSON carries it as ``\\u0000``)
    or 70,000 characters asks for a retry: the retry's envelope id is that task id. Where
    the broker can hold it the task runs twice (the run and its retry); where it cannot, the
    retry fails the task once. Never more: a refusal taken for a transient failure gives the
    message back, and it runs again until worker_max_deliveries."""
    where = place(broker, tmp_path)
    runs = Runs(tmp_path / "runs")
    queue = unique_name("retry-odd")
    app, tasks = hostile_app(where, runs, task_default_queue=queue, worker_max_deliveries=4)
    odd = ODD_TASK_IDS[kind]()
    with server_lock(where):
        planter = Planter(where, app)
        try:
            app.broker.declare_queue(queue)
            envelope = celery_envelope("h.retry_once", odd)
            envelope = dataclasses.replace(envelope, id=unique_name("safe"), correlation_id=None)
            try:
                app.broker.publish(envelope, queue=queue)
            except OperationalError:
                planter.plant_envelope(queue, envelope)
            after = tasks["count"].apply_async((1,))
            with running(app, queues=[queue]) as (worker, thread):
                assert after.get(timeout=60) == 1

                def quiet() -> bool:
                    # ran, and nothing of it left: not held here, not waiting in the queue
                    with worker._cond:
                        held = len(worker._held)
                    return runs.count(odd) >= 1 and held == 0 and settled(app, queue)[0] == 0

                eventually(quiet, 90, message="the odd task ran and settled")
                assert thread.is_alive()
            executions = runs.count(odd)
            assert executions <= 2, f"ran {executions} times"
            assert settled(app, queue) == (0, 0)
        finally:
            planter.close()
            app.close()
            cleanup(where, queue)
    figures(f"1-retry-refused-{kind}", broker, bad_inputs=1, executions=executions, lost=0)


REFUSED_IDS = {
    "memory": ["nul\x00id", "\ud800", "z" * 1100],
    "sqlite": ["x" * 200, "nul\x00id"],
    "postgres": ["x" * 200, "nul\x00id"],
    "mysql": ["x" * 200, "\ud800"],
    "redis": ["z" * 1100, "\ud800"],
    "rpc": ["z" * 300, "nul\x00id"],
    "mongodb": ["z" * 1100, "nul\x00id"],
    "memcached": ["a space", "ctrl\x01", "non-ascii-\u00e9", "m" * 240],
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_id_the_result_backend_refuses_is_refused_at_apply_async(
    backend: str, tmp_path: Path
) -> None:
    where = backend_place(backend, tmp_path)
    queue = unique_name("ids")
    app, tasks = hostile_app(where, Runs(tmp_path / "runs"), task_default_queue=queue)
    published: list[str] = []
    with server_lock(where):
        try:
            app.broker.declare_queue(queue)
            for odd in REFUSED_IDS[backend]:
                with pytest.raises(ConfigurationError):
                    app.backend.validate_task_id(odd)  # the backend does refuse it
                try:
                    tasks["count"].apply_async((1,), task_id=odd)
                    published.append(odd)
                except ConfigurationError:
                    pass
        finally:
            app.close()
            cleanup(where, queue)
    assert published == [], f"{len(published)} refused ids published"


@pytest.mark.parametrize(
    "option",
    [{"countdown": 1e300}, {"countdown": float("inf")}, {"expires": float("inf")},
     {"expires": float("nan")}, {"expires": 1e300}],
    ids=["countdown-1e300", "countdown-inf", "expires-inf", "expires-nan", "expires-1e300"],
)  # fmt: skip
def test_a_countdown_or_expiry_no_clock_can_hold_is_a_configuration_error_at_send(
    option: dict[str, float], tmp_path: Path
) -> None:
    app, tasks = hostile_app(place("memory", tmp_path), Runs(tmp_path / "runs"))
    try:
        with pytest.raises(ConfigurationError):
            tasks["count"].apply_async((1,), **option)
        assert app.broker.size("celery") == 0
    finally:
        app.close()

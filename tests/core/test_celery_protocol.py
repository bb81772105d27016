"""Golden tests: conveyor's Celery wire formats against real Celery 5.7, in process.

Messages come from ``app.amqp.as_task_v2`` and from ``send_task`` through kombu's in-memory
transport (the same JSON envelope the Redis transport stores); results come from Celery's own
key-value backend code. Committed fixtures (``fixtures/``) pin captured bytes, including the
verified Redis envelope (docs/celery-compat.md#kombu-envelope-on-redis).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import serialization as kombu_serialization
from kombu.message import Message as KombuMessage
from kombu.transport.memory import Channel as MemoryChannel

from conveyor.core.celery import (
    COMPRESSED_RESULT_MARKER,
    TaskMessage,
    build_envelope,
    decode_meta,
    default_origin,
    encode_meta,
    exception_from_meta,
    exception_to_meta,
    group_from_meta,
    group_meta,
    meta_from_record,
    parse_envelope,
    peek,
    record_from_meta,
    result_tuple,
    saferepr,
)
from conveyor.core.errors import (
    ContentDisallowed,
    DecodeError,
    EncodeError,
    SerializationError,
    TaskError,
)
from conveyor.core.types import Envelope, ResultRecord, State

# Celery is a test-only dependency: the "unit" tox env runs without it and skips this module.
pytest.importorskip("celery")

from celery import Celery
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import SecurityError
from celery.utils.saferepr import saferepr as celery_saferepr
from celery.worker.request import Request as CeleryRequest

FIXTURES = Path(__file__).parent / "fixtures"
UTC = dt.timezone.utc


# ------------------------------------------------------------------------------- helpers


class DictBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery's key-value backend logic over a dict, with 5.7 result compression allowed."""

    supports_result_compression = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data: dict[bytes, Any] = {}

    def get(self, key: bytes) -> Any:
        return self.data.get(key)

    def mget(self, keys: list[bytes]) -> list[Any]:
        return [self.data.get(k) for k in keys]

    def set(self, key: bytes, value: Any) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)


class OuterError(Exception):
    class InnerError(ValueError):
        pass


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


class TwoArgError(Exception):
    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a, b)


def envelope_from_kombu(payload: dict[str, Any]) -> Envelope:
    """What a transport does with a kombu virtual envelope (Redis/SQL/Mongo/memory)."""
    props = payload["properties"]
    body = payload["body"]
    raw = base64.b64decode(body) if props.get("body_encoding") == "base64" else body.encode()
    return Envelope(
        id=payload["headers"].get("id") or props["correlation_id"],
        body=raw,
        content_type=payload["content-type"],
        content_encoding=payload["content-encoding"],
        headers=payload["headers"],
        priority=props.get("priority", 0),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
    )


def kombu_message(envelope: Envelope, accept: list[str] | None = None) -> KombuMessage:
    return KombuMessage(
        body=envelope.body,
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        headers=dict(envelope.headers),
        properties={
            "correlation_id": envelope.correlation_id,
            "reply_to": envelope.reply_to,
            "priority": envelope.priority,
        },
        delivery_info={"exchange": "", "routing_key": "celery"},
        accept=accept or ["application/json"],
        channel=None,
    )


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


@pytest.fixture
def app() -> Celery:
    application = Celery("tasks", broker="memory://", backend="cache+memory://")
    application.conf.task_default_queue = f"q-{uuid.uuid4()}"

    @application.task(name="tasks.add", shared=False)  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    return application


def pop_published(app: Celery) -> dict[str, Any]:
    message: dict[str, Any] = MemoryChannel.queues[app.conf.task_default_queue].get(block=False)
    return message


def sig(name: str, *args: Any, **options: Any) -> dict[str, Any]:
    return {
        "task": name,
        "args": list(args),
        "kwargs": {},
        "options": options,
        "subtask_type": None,
        "immutable": False,
    }


def celery_body_bytes(body: Any) -> bytes:
    _, _, payload = kombu_serialization.dumps(body, serializer="json")
    return payload.encode() if isinstance(payload, str) else payload


# ================================================================ building: as_task_v2 golden


def test_build_matches_as_task_v2_field_for_field(app: Celery) -> None:
    task_id, root, parent, group = (str(uuid.uuid4()) for _ in range(4))
    eta = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    expires = eta + dt.timedelta(hours=1)
    callbacks = [sig("tasks.cb", 1)]
    errbacks = [sig("tasks.eb")]
    chain = [sig("tasks.last", task_id="x"), sig("tasks.next", task_id="y")]
    chord = sig("tasks.body", group_id=group)
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        "tasks.add",
        args=(2, "ü", [1, [2, [3, [4]]]]),
        kwargs={"k": {"nested": b"bytes"}, "d": dt.date(2024, 5, 6)},
        eta=eta,
        expires=expires,
        group_id=group,
        group_index=3,
        retries=2,
        chord=chord,
        callbacks=callbacks,
        errbacks=errbacks,
        chain=chain,
        reply_to="reply-queue",
        time_limit=30,
        soft_time_limit=20.5,
        root_id=root,
        parent_id=parent,
        shadow="shadow-name",
        ignore_result=True,
        stamped_headers=["s1"],
        s1="stamp-value",
        replaced_task_nesting=1,
    )
    msg = TaskMessage(
        task="tasks.add",
        id=task_id,
        args=(2, "ü", [1, [2, [3, [4]]]]),
        kwargs={"k": {"nested": b"bytes"}, "d": dt.date(2024, 5, 6)},
        eta=eta,
        expires=expires,
        group=group,
        group_index=3,
        retries=2,
        chord=chord,
        callbacks=callbacks,
        errbacks=errbacks,
        chain=chain,
        reply_to="reply-queue",
        timelimit=(30, 20.5),
        root_id=root,
        parent_id=parent,
        shadow="shadow-name",
        ignore_result=True,
        stamped_headers=("s1",),
        stamps={"s1": "stamp-value"},
        replaced_task_nesting=1,
    )
    env = build_envelope(msg)
    # origin is gen<pid>@<host>: identical in process, so even it is compared.
    assert dict(env.headers) == headers
    assert list(env.headers) == list(headers)  # same order, so the same JSON/AMQP bytes
    assert env.body == celery_body_bytes(body)
    assert env.correlation_id == properties["correlation_id"] == task_id
    assert env.reply_to == properties["reply_to"]
    assert (env.content_type, env.content_encoding) == ("application/json", "utf-8")


def test_defaults_match_a_plain_celery_call(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    headers, _, body, _ = app.amqp.as_task_v2(task_id, "tasks.add", args=(2, 3))
    env = build_envelope(TaskMessage("tasks.add", task_id, (2, 3)))
    assert dict(env.headers) == headers
    assert headers["origin"] == default_origin()
    assert env.body == celery_body_bytes(body)
    assert env.body == (
        b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    )


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
arg_tuples = st.lists(json_values, max_size=5).map(tuple)
kwarg_maps = st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=5)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=arg_tuples, kwargs=kwarg_maps)
def test_random_arguments_build_byte_identical_messages(
    app: Celery, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    task_id = str(uuid.uuid4())
    headers, _, body, _ = app.amqp.as_task_v2(task_id, "tasks.add", args=args, kwargs=kwargs)
    env = build_envelope(TaskMessage("tasks.add", task_id, args, kwargs))
    assert dict(env.headers) == headers  # includes argsrepr/kwargsrepr
    assert env.body == celery_body_bytes(body)


def test_long_arguments_are_truncated_in_the_repr_exactly_like_celery(app: Celery) -> None:
    args = ("x" * 5000, list(range(2000)), {"k": "y" * 3000})
    kwargs = {f"key{i}": "v" * i for i in range(200)}
    headers, _, _, _ = app.amqp.as_task_v2("id", "tasks.add", args=args, kwargs=kwargs)
    env = build_envelope(TaskMessage("tasks.add", "id", args, kwargs))
    assert env.headers["argsrepr"] == headers["argsrepr"]
    assert env.headers["kwargsrepr"] == headers["kwargsrepr"]
    assert len(headers["argsrepr"]) < 1100


repr_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=20)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.frozensets(st.integers(), max_size=3)
    | st.dates(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4)
        | st.sets(st.integers() | st.text(max_size=5), max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(repr_values, st.none() | st.integers(min_value=-2, max_value=200), st.integers(0, 4))
def test_saferepr_matches_celery(value: Any, maxlen: int | None, maxlevels: int) -> None:
    assert saferepr(value, maxlen, maxlevels) == celery_saferepr(value, maxlen, maxlevels)


def test_saferepr_survives_recursive_values() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    assert saferepr(loop, 1024, 0) == celery_saferepr(loop, 1024, 0)


# ========================================================== building: through a real producer


def test_send_task_through_the_memory_transport_matches_our_envelope(app: Celery) -> None:
    app.send_task(
        "tasks.add",
        args=(2, 3),
        kwargs={"name": "naïve ✓"},
        countdown=10,
        expires=3600,
        priority=5,
        compression="zlib",
        headers={"custom": 1},
    )
    payload = pop_published(app)
    theirs = envelope_from_kombu(payload)
    parsed = parse_envelope(theirs)
    assert parsed.task == "tasks.add"
    assert parsed.args == (2, 3)
    assert parsed.kwargs == {"name": "naïve ✓"}
    assert parsed.headers == {"custom": 1}
    assert parsed.priority == 5
    assert parsed.eta is not None
    assert parsed.expires is not None
    assert parsed.eta.tzinfo is not None
    assert dt.timedelta(seconds=3589) < parsed.expires - parsed.eta < dt.timedelta(seconds=3591)

    ours = build_envelope(parsed, compression="zlib")
    their_headers = dict(payload["headers"])
    our_headers = dict(ours.headers)
    # send_task without ignore_result sends null; we always send a bool.
    assert their_headers.pop("ignore_result") is None
    assert our_headers.pop("ignore_result") is False
    assert our_headers == their_headers
    assert list(our_headers) == list(their_headers)
    assert ours.body == theirs.body  # zlib at the same level: identical bytes
    assert ours.priority == theirs.priority
    assert ours.correlation_id == theirs.correlation_id == parsed.id
    assert ours.reply_to == theirs.reply_to


def test_a_celery_worker_request_runs_our_message(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    eta = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
    env = build_envelope(
        TaskMessage("tasks.add", task_id, (2, 3), eta=eta, reply_to="rq", priority=3),
        compression="bzip2",
    )
    message = kombu_message(env)
    args, kwargs, embed = message.decode()  # kombu: accept check + decompression
    assert (args, kwargs) == ([2, 3], {})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    request = CeleryRequest(message, app=app, task=app.tasks["tasks.add"])
    assert (request.id, request.name, request.reply_to) == (task_id, "tasks.add", "rq")
    assert request.eta == eta
    assert request.execute() == 5
    stored = app.backend.get(app.backend.get_key_for_task(task_id))
    record = decode_meta(stored)
    assert (record.task_id, record.state, record.result) == (task_id, State.SUCCESS, 5)


def test_celery_follows_a_chain_we_built_and_sends_the_next_step(app: Celery) -> None:
    chain = [sig("tasks.add", 5, 6), sig("tasks.add", 3)]  # reversed: add(3) runs next
    env = build_envelope(
        TaskMessage("tasks.add", "id-1", (1,), {"y": 2}, chain=chain, errbacks=[sig("tasks.eb")])
    )
    request = CeleryRequest(kombu_message(env), app=app, task=app.tasks["tasks.add"])
    assert request.errbacks == [sig("tasks.eb")]
    assert request.execute() == 3
    # Celery's tracer published the next step: our parser reads what it sent.
    step = parse_envelope(envelope_from_kombu(pop_published(app)))
    assert (step.task, step.args) == ("tasks.add", (3, 3))
    assert step.chain is not None
    assert [s["args"] for s in step.chain] == [[5, 6]]
    assert step.parent_id == "id-1"
    assert step.root_id == "id-1"


# ============================================================================= fixtures


def test_the_verified_redis_envelope_from_the_wire_spec_parses() -> None:
    env = envelope_from_kombu(load_fixture("wire_spec_redis_envelope.json"))
    msg = parse_envelope(env)
    assert msg.task == "tasks.add"
    assert msg.id == "1ba0…"
    assert msg.args == (2, 3)
    assert msg.kwargs == {}
    assert msg.eta == dt.datetime(2026, 11, 21, 23, 39, 55, 509939, tzinfo=UTC)
    assert msg.expires == dt.datetime(2026, 11, 22, 0, 39, 45, 509939, tzinfo=UTC)
    assert msg.priority == 5
    assert msg.reply_to == "38e2…"
    assert msg.timelimit == (None, None)
    assert msg.origin == "gen9875@vm"
    assert msg.headers == {}
    # and we rebuild it byte for byte
    rebuilt = build_envelope(msg)
    assert rebuilt.body == env.body
    assert dict(rebuilt.headers) == dict(env.headers)


@pytest.mark.parametrize(
    "name",
    [
        "celery_v2_redis_envelope.json",
        "celery_v2_zlib_envelope.json",
        "celery_v2_chain_envelope.json",
    ],
)
def test_every_captured_v2_message_rebuilds_byte_for_byte(name: str) -> None:
    payload = load_fixture(name)
    env = envelope_from_kombu(payload)
    msg = parse_envelope(env)
    assert msg.id == payload["properties"]["correlation_id"]
    assert msg.priority == payload["properties"]["priority"]
    rebuilt = build_envelope(msg, compression="zlib" if "compression" in env.headers else None)
    assert rebuilt.body == env.body
    expected = dict(payload["headers"])
    if expected["ignore_result"] is None:  # send_task without the option sends null
        expected["ignore_result"] = False
    assert dict(rebuilt.headers) == expected
    assert list(rebuilt.headers) == list(expected)
    assert (rebuilt.correlation_id, rebuilt.reply_to) == (
        payload["properties"]["correlation_id"],
        payload["properties"]["reply_to"],
    )


def test_captured_redis_envelope_times_and_expiration() -> None:
    payload = load_fixture("celery_v2_redis_envelope.json")
    msg = parse_envelope(envelope_from_kombu(payload))
    assert msg.priority == 5
    assert msg.eta is not None
    assert msg.expires is not None
    # countdown=10, expires=3600: both counted from the same "now" on the client
    assert msg.expires - msg.eta == dt.timedelta(seconds=3590)
    assert payload["properties"]["expiration"] == "3600000"


def test_captured_compressed_fixture_parses_and_rebuilds_identically() -> None:
    payload = load_fixture("celery_v2_zlib_envelope.json")
    env = envelope_from_kombu(payload)
    assert env.headers["compression"] == "application/x-gzip"
    msg = parse_envelope(env)
    assert msg.kwargs == {"label": "naïve ✓"}
    assert msg.timelimit == (30, 20)
    assert msg.headers == {"custom": "yes"}
    rebuilt = build_envelope(msg, compression="zlib")
    assert rebuilt.body == env.body
    expected = {**payload["headers"], "ignore_result": False}
    assert dict(rebuilt.headers) == expected


def test_captured_chain_fixture_keeps_the_reversed_chain_and_errbacks() -> None:
    msg = parse_envelope(envelope_from_kombu(load_fixture("celery_v2_chain_envelope.json")))
    assert msg.args == (1, 2)
    assert msg.chain is not None
    assert [(s["task"], s["args"]) for s in msg.chain] == [
        ("tasks.add", [5, 6]),
        ("tasks.add", [3]),
    ]
    assert msg.chain[-1]["immutable"] is False  # the immediate successor is the last element
    assert msg.errbacks is not None
    assert msg.errbacks[0]["args"] == [0, 0]
    assert msg.chain[-1]["options"]["link_error"] == msg.errbacks


def test_captured_protocol_v1_fixture_parses() -> None:
    payload = load_fixture("celery_v1_envelope.json")
    assert payload["headers"] == {}
    env = envelope_from_kombu(payload)
    msg = parse_envelope(env)
    assert (msg.task, msg.args, msg.kwargs) == ("tasks.add", (7, 8), {"z": 1})
    assert msg.id == payload["properties"]["correlation_id"]
    assert msg.eta is not None
    assert msg.eta.tzinfo is not None
    assert peek(env).task is None  # v1 keeps the name in the body


def test_captured_result_metas_decode() -> None:
    metas = load_fixture("celery_result_metas.json")
    ok = decode_meta(metas["celery-task-meta-5a0c3f0e-0000-4000-8000-000000000001"])
    assert (ok.state, ok.result, ok.children) == (State.SUCCESS, {"sum": 5}, None)
    assert ok.date_done is not None
    assert ok.date_done.utcoffset() == dt.timedelta(0)
    failed = decode_meta(metas["celery-task-meta-5a0c3f0e-0000-4000-8000-000000000002"])
    assert failed.state is State.FAILURE
    assert failed.traceback is not None
    assert "KeyError" in failed.traceback
    exc = exception_from_meta(failed.result)
    assert type(exc) is KeyError
    assert exc.args == ("nope",)
    extended = decode_meta(metas["celery-task-meta-5a0c3f0e-0000-4000-8000-000000000003"])
    assert extended.group_id == "5a0c3f0e-0000-4000-8000-00000000000a"
    assert extended.parent_id == "5a0c3f0e-0000-4000-8000-000000000001"
    assert dict(extended.extended) == {
        "name": "tasks.add",
        "args": [1, 2],
        "kwargs": {"k": "v"},
        "worker": "celery@vm",
        "retries": 1,
        "queue": "golden",
    }
    # re-encoding reproduces Celery's bytes exactly, key order included
    for key in list(metas)[:3]:
        record = decode_meta(metas[key])
        assert encode_meta(record) == metas[key].encode()
    group = group_from_meta(
        json.loads(metas["celery-taskset-meta-5a0c3f0e-0000-4000-8000-00000000000a"])
    )
    assert group.group_id == "5a0c3f0e-0000-4000-8000-00000000000a"
    assert group.task_ids == (
        "5a0c3f0e-0000-4000-8000-000000000001",
        "5a0c3f0e-0000-4000-8000-000000000002",
    )


# ========================================================================== strict parsing


def _env(body: bytes, headers: dict[str, Any] | None = None, **kw: Any) -> Envelope:
    base = {"task": "tasks.add", "id": "t-1"}
    return Envelope(id="t-1", body=body, headers=base if headers is None else headers, **kw)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[[1, 2], {}]", "3 items"),
        (b"[[1, 2], {}, {}, {}]", "3 items"),
        (b"[]", "3 items"),
        (b'"a string"', "must be \\[args, kwargs, embed\\]"),
        (b"[{}, {}, {}]", "args must be a list"),
        (b"[[], [], {}]", "kwargs must be a map"),
        (b"[[], {}, []]", "embed must be a map"),
        (b'[[], {}, {"callbacks": "x"}]', "callbacks"),
        (b'[[], {}, {"chain": [1]}]', "chain"),
        (b'[[], {}, {"chord": [1]}]', "chord"),
    ],
)
def test_v2_body_of_the_wrong_shape_is_a_decode_error(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        parse_envelope(_env(body))


def test_null_embed_is_accepted_like_celery_does() -> None:
    msg = parse_envelope(_env(b"[[1], {}, null]"))
    assert (msg.args, msg.callbacks, msg.chain, msg.chord) == ((1,), None, None, None)


@pytest.mark.parametrize(
    "headers",
    [
        {"task": "", "id": "x"},
        {"task": 5, "id": "x"},
        {"task": "t"},
        {"task": "t", "id": "x", "retries": "1"},
        {"task": "t", "id": "x", "timelimit": [1]},
        {"task": "t", "id": "x", "timelimit": ["a", None]},
        {"task": "t", "id": "x", "eta": "tomorrow"},
        {"task": "t", "id": "x", "expires": 12},
        {"task": "t", "id": "x", "group": 12},
        {"task": "t", "id": "x", "stamped_headers": "s"},
        {"task": "t", "id": "x", "compression": "application/x-snappy"},
    ],
)
def test_bad_headers_are_decode_errors(headers: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        parse_envelope(_env(b"[[], {}, {}]", headers))


def test_no_task_anywhere_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not a Celery task message"):
        parse_envelope(_env(b'{"args": []}', {}))


def test_disallowed_content_is_refused_before_decompression() -> None:
    env = _env(b"garbage", content_type="application/x-python-serialize")
    env = Envelope(
        id="t",
        body=b"garbage",
        content_type="application/x-python-serialize",
        headers={"task": "t", "id": "t", "compression": "application/x-gzip"},
    )
    with pytest.raises(ContentDisallowed):
        parse_envelope(env)


def test_corrupt_compressed_body_is_a_decode_error() -> None:
    env = _env(b"not zlib", {"task": "t", "id": "x", "compression": "application/x-gzip"})
    with pytest.raises(DecodeError):
        parse_envelope(env)


def test_decompression_limit_applies_to_message_bodies() -> None:
    env = build_envelope(TaskMessage("t", "x", ("z" * 10_000,)), compression="zlib")
    with pytest.raises(DecodeError, match="exceeds"):
        parse_envelope(env, max_size=1000)


def test_accept_list_is_honoured_for_other_serializers() -> None:
    pytest.importorskip("msgpack")
    env = build_envelope(TaskMessage("t", "x", (b"\x00raw", "é")), serializer="msgpack")
    assert env.content_type == "application/x-msgpack"
    with pytest.raises(ContentDisallowed):
        parse_envelope(env)
    assert parse_envelope(env, accept={"msgpack"}).args == (b"\x00raw", "é")


def test_yaml_messages_round_trip() -> None:
    pytest.importorskip("yaml")
    msg = TaskMessage("t", "x", (1, "two"), {"k": [1, 2]})
    env = build_envelope(msg, serializer="yaml")
    parsed = parse_envelope(env, accept=["yaml"])
    assert (parsed.args, parsed.kwargs) == (msg.args, msg.kwargs)


# ========================================================================= times and peek


def test_naive_eta_is_read_as_utc_and_z_suffix_is_accepted() -> None:
    env = _env(
        b"[[], {}, {}]",
        {"task": "t", "id": "x", "eta": "2026-01-02T03:04:05", "expires": "2026-01-02T04:00:00Z"},
    )
    msg = parse_envelope(env)
    assert msg.eta == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert msg.expires == dt.datetime(2026, 1, 2, 4, tzinfo=UTC)


def test_other_timezones_are_kept_as_sent() -> None:
    env = _env(b"[[], {}, {}]", {"task": "t", "id": "x", "eta": "2026-01-02T03:04:05+02:00"})
    eta = parse_envelope(env).eta
    assert eta is not None
    assert eta == dt.datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert eta.utcoffset() == dt.timedelta(hours=2)


def test_naive_eta_is_sent_as_utc() -> None:
    env = build_envelope(TaskMessage("t", "x", eta=dt.datetime(2026, 1, 2, 3, 4, 5)))
    assert env.headers["eta"] == "2026-01-02T03:04:05+00:00"


def test_v1_with_utc_false_reads_naive_times_as_local_time() -> None:
    body = json.dumps(
        {
            "task": "t",
            "id": "x",
            "args": [],
            "kwargs": {},
            "eta": "2026-01-02T03:04:05",
            "utc": False,
        }
    ).encode()
    eta = parse_envelope(_env(body, {})).eta
    assert eta == dt.datetime(2026, 1, 2, 3, 4, 5).astimezone()


def test_peek_reads_headers_without_touching_the_body() -> None:
    env = _env(
        b"\xff this body is not even json",
        {"task": "tasks.add", "id": "abc", "eta": None, "expires": "2026-01-02T03:04:05+00:00"},
    )
    assert peek(env) == ("tasks.add", "abc", None, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    with pytest.raises(DecodeError):
        peek(_env(b"", {"task": "t", "id": "x", "expires": "soon"}))


def test_peek_on_v1_reports_only_the_envelope_id() -> None:
    assert peek(Envelope(id="abc", body=b"{}", headers={})) == (None, "abc", None, None)


# ============================================================== extras, stamps, hybrid, v1


def test_extra_headers_round_trip_and_may_not_shadow_protocol_keys() -> None:
    msg = TaskMessage("t", "x", headers={"tenant": "acme", "x-trace": [1, 2]})
    env = build_envelope(msg)
    assert env.headers["tenant"] == "acme"
    assert parse_envelope(env).headers == {"tenant": "acme", "x-trace": [1, 2]}
    with pytest.raises(EncodeError, match="eta"):
        build_envelope(TaskMessage("t", "x", headers={"eta": "now"}))


def test_redelivered_flag_added_by_kombu_shows_up_as_an_extra_header() -> None:
    env = build_envelope(TaskMessage("t", "x"))
    restored = Envelope(id=env.id, body=env.body, headers={**env.headers, "redelivered": True})
    assert parse_envelope(restored).headers == {"redelivered": True}


def test_stamps_round_trip_and_top_level_copies_are_not_extras() -> None:
    msg = TaskMessage("t", "x", stamped_headers=("mystamp",), stamps={"mystamp": "v"})
    env = build_envelope(msg)
    assert "mystamp" not in env.headers  # Celery 5.7 does not copy stamps to the top level
    older = Envelope(id="x", body=env.body, headers={**env.headers, "mystamp": "v"})
    parsed = parse_envelope(older)
    assert parsed.stamped_headers == ("mystamp",)
    assert parsed.stamps == {"mystamp": "v"}
    assert parsed.headers == {}


def test_stamped_message_from_celery_parses(app: Celery) -> None:
    signature = app.tasks["tasks.add"].s(1, 2)
    signature.stamp(mystamp="v")
    signature.apply_async()
    msg = parse_envelope(envelope_from_kombu(pop_published(app)))
    assert (msg.stamped_headers, msg.stamps) == (("mystamp",), {"mystamp": "v"})


def test_hybrid_message_header_values_win_over_the_body() -> None:
    body = json.dumps(
        {
            "task": "t",
            "id": "x",
            "args": [1],
            "kwargs": {"a": 1},
            "retries": 1,
            "callbacks": [sig("cb")],
        }
    ).encode()
    msg = parse_envelope(_env(body, {"task": "t", "id": "x", "retries": 4}))
    assert (msg.args, msg.kwargs, msg.retries) == ((1,), {"a": 1}, 4)
    assert msg.callbacks == [sig("cb")]
    assert msg.chain is None


def test_v1_message_built_by_celery_parses(app: Celery) -> None:
    headers, properties, body, _ = app.amqp.as_task_v1(
        "v1-id",
        "tasks.add",
        args=(1, 2),
        kwargs={"k": 3},
        group_id="g",
        retries=2,
        time_limit=10,
        soft_time_limit=5,
        expires=dt.datetime(2030, 1, 1, tzinfo=UTC),
    )
    raw = celery_body_bytes(body)
    msg = parse_envelope(
        Envelope(id="v1-id", body=raw, headers=headers, correlation_id=properties["correlation_id"])
    )
    assert (msg.task, msg.id, msg.args, msg.kwargs) == ("tasks.add", "v1-id", (1, 2), {"k": 3})
    assert (msg.group, msg.retries, msg.timelimit) == ("g", 2, (10, 5))
    assert msg.expires == dt.datetime(2030, 1, 1, tzinfo=UTC)


def test_task_message_normalizes_args_and_checks_kwargs() -> None:
    assert TaskMessage("t", "x", [1, 2]).args == (1, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TaskMessage("t", "x", "12")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TaskMessage("t", "x", (), [("a", 1)])  # type: ignore[arg-type]


# ================================================================== properties (hypothesis)


@settings(max_examples=200, deadline=None)
@given(args=arg_tuples, kwargs=kwarg_maps, retries=st.integers(0, 50), priority=st.integers(0, 9))
def test_build_then_parse_round_trips(
    args: tuple[Any, ...], kwargs: dict[str, Any], retries: int, priority: int
) -> None:
    msg = TaskMessage(
        "tasks.ü",
        str(uuid.uuid4()),
        args,
        kwargs,
        retries=retries,
        priority=priority,
        eta=dt.datetime(2026, 1, 1, tzinfo=UTC),
        reply_to="r",
    )
    parsed = parse_envelope(build_envelope(msg, compression="zlib"))
    assert parsed.args == args
    assert parsed.kwargs == kwargs
    assert (parsed.retries, parsed.priority, parsed.eta) == (retries, priority, msg.eta)
    assert (parsed.root_id, parsed.correlation_id, parsed.reply_to) == (msg.id, msg.id, "r")


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200),
    headers=st.sampled_from(
        [
            {"task": "t", "id": "x"},
            {},
            {"task": "t", "id": "x", "compression": "application/x-gzip"},
            {"task": "t", "id": "x", "compression": "application/x-bz2"},
        ]
    ),
)
def test_random_bodies_raise_only_serialization_errors(
    body: bytes, headers: dict[str, Any]
) -> None:
    with contextlib.suppress(SerializationError):
        parse_envelope(Envelope(id="x", body=body, headers=headers))


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_random_json_documents_raise_only_serialization_errors(value: Any) -> None:
    body = json.dumps(value).encode()
    for headers in ({"task": "t", "id": "x"}, {}):
        with contextlib.suppress(SerializationError):
            parse_envelope(Envelope(id="x", body=body, headers=headers))


# ============================================================================ result metas


def _celery_backend(app: Celery, **conf: Any) -> DictBackend:
    app.conf.update(conf)
    return DictBackend(app=app)


def test_celery_written_success_meta_is_read_and_rewritten_byte_for_byte(app: Celery) -> None:
    backend = _celery_backend(app)
    backend.store_result("t-ok", {"x": [1, 2], "u": "ü"}, "SUCCESS")
    raw = backend.get(backend.get_key_for_task("t-ok"))
    record = decode_meta(raw)
    assert record.result == {"x": [1, 2], "u": "ü"}
    assert record.task_id == "t-ok"
    assert encode_meta(record) == raw.encode()


def test_our_meta_is_read_by_celery(app: Celery) -> None:
    backend = _celery_backend(app)
    done = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    record = ResultRecord(
        "t-ours", State.SUCCESS, {"n": 1}, date_done=done, children=[], group_id="g", parent_id="p"
    )
    backend.set(backend.get_key_for_task("t-ours"), encode_meta(record))
    meta = backend.get_task_meta("t-ours")
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == {"n": 1}
    assert meta["date_done"] == "2026-01-02T03:04:05.000006+00:00"
    assert (meta["group_id"], meta["parent_id"], meta["children"]) == ("g", "p", [])
    assert app.AsyncResult("t-ours", backend=backend).get(timeout=1) == {"n": 1}


def test_extended_meta_matches_celerys_bytes(app: Celery) -> None:
    backend = _celery_backend(app, result_extended=True)

    class Req:
        id = "t-ext"
        task = "tasks.add"
        args = [1, 2]
        kwargs = {"k": "v"}
        hostname = "celery@host"
        retries = 2
        delivery_info = {"routing_key": "q"}
        group = "g-1"
        parent_id = "p-1"
        children: list[Any] = []
        stamps = None
        ignore_result = False

    backend.store_result("t-ext", 3, "SUCCESS", request=Req())
    raw = backend.get(backend.get_key_for_task("t-ext"))
    record = decode_meta(raw)
    assert record.extended["worker"] == "celery@host"
    assert record.extended["queue"] == "q"
    assert encode_meta(record) == raw.encode()


def test_failure_meta_from_celery_rebuilds_the_exception(app: Celery) -> None:
    backend = _celery_backend(app)
    backend.mark_as_failure("t-f", TwoArgError("boom", 42), traceback="tb text")
    record = decode_meta(backend.get(backend.get_key_for_task("t-f")))
    assert record.state is State.FAILURE
    assert record.result == {
        "exc_type": "TwoArgError",
        "exc_message": ["boom", 42],
        "exc_module": __name__,
    }
    exc = exception_from_meta(record.result)
    assert type(exc) is TwoArgError
    assert exc.args == ("boom", 42)


def test_our_exception_meta_is_rebuilt_by_celery(app: Celery) -> None:
    backend = _celery_backend(app)
    for original in (ValueError("bad", 1), OuterError.InnerError("nested"), TwoArgError("a", [1])):
        meta = exception_to_meta(original)
        theirs = backend.prepare_exception(original)
        # the same document as Celery's (Celery holds a tuple that encodes as our list)
        assert meta == {**theirs, "exc_message": list(theirs["exc_message"])}
        assert encode_meta(ResultRecord("t", State.FAILURE, meta)) == encode_meta(
            ResultRecord("t", State.FAILURE, theirs)
        )
        rebuilt = backend.exception_to_python(meta)
        assert type(rebuilt) is type(original)
        assert rebuilt.args == original.args
        ours = exception_from_meta(meta)
        assert type(ours) is type(original)
        assert ours.args == original.args


def test_our_failure_record_is_raised_by_celerys_async_result(app: Celery) -> None:
    backend = _celery_backend(app)
    record = ResultRecord(
        "t-raise",
        State.FAILURE,
        KeyError("missing"),
        traceback="tb",
        date_done=dt.datetime.now(UTC),
    )
    backend.set(backend.get_key_for_task("t-raise"), encode_meta(record))
    with pytest.raises(KeyError, match="missing"):
        app.AsyncResult("t-raise", backend=backend).get(timeout=1)


def test_unserializable_exception_arguments_become_reprs_like_celery(app: Celery) -> None:
    backend = _celery_backend(app)
    exc = ValueError(Opaque(), "fine", {"nested": Opaque()})
    ours = exception_to_meta(exc)
    theirs = backend.prepare_exception(exc)
    assert ours["exc_message"] == ["<Opaque>", "fine", "{'nested': <Opaque>}"]
    assert ours["exc_message"] == list(theirs["exc_message"])


def test_exceptions_from_unloaded_modules_become_task_errors(app: Celery) -> None:
    meta = {"exc_type": "MyErr", "exc_message": ["custom"], "exc_module": "app2_not_loaded"}
    assert "app2_not_loaded" not in sys.modules
    exc = exception_from_meta(meta, traceback="remote tb")
    assert isinstance(exc, TaskError)
    assert (exc.exc_type, exc.exc_message, exc.exc_module) == (
        "MyErr",
        ["custom"],
        "app2_not_loaded",
    )
    assert exc.remote_traceback == "remote tb"
    assert "app2_not_loaded" not in sys.modules  # nothing was imported
    assert exception_to_meta(exc) == meta  # and it goes back out unchanged
    assert backend_type_name(app, meta) == "MyErr"


def backend_type_name(app: Celery, meta: dict[str, Any]) -> str:
    return type(_celery_backend(app).exception_to_python(meta)).__name__


def test_non_exception_targets_are_never_called() -> None:
    meta = {"exc_type": "system", "exc_message": ["echo pwned"], "exc_module": "os"}
    assert isinstance(exception_from_meta(meta), TaskError)
    dotted = {"exc_type": "path.join", "exc_message": ["a"], "exc_module": "os"}
    assert isinstance(exception_from_meta(dotted), TaskError)


def test_celery_refuses_the_same_non_exception_target(app: Celery) -> None:
    meta = {"exc_type": "system", "exc_message": ["echo pwned"], "exc_module": "os"}
    with pytest.raises(SecurityError):
        _celery_backend(app).exception_to_python(meta)


def test_celery_exceptions_rebuild_when_celery_is_loaded() -> None:
    revoked = {
        "exc_type": "TaskRevokedError",
        "exc_message": ["revoked"],
        "exc_module": "celery.exceptions",
    }
    exc = exception_from_meta(revoked)
    assert type(exc).__name__ == "TaskRevokedError"
    assert exc.args == ("revoked",)


def test_constructor_mismatch_and_scalar_messages() -> None:
    bad_arity = {"exc_type": "TwoArgError", "exc_message": ["only one"], "exc_module": __name__}
    assert isinstance(exception_from_meta(bad_arity), TaskError)
    scalar = {"exc_type": "ValueError", "exc_message": "just text", "exc_module": "builtins"}
    exc = exception_from_meta(scalar)
    assert type(exc) is ValueError
    assert exc.args == ("just text",)
    no_module = {"exc_type": "ValueError", "exc_message": []}
    assert isinstance(exception_from_meta(no_module), TaskError)
    with pytest.raises(DecodeError):
        exception_from_meta({"exc_message": []})
    with pytest.raises(DecodeError):
        exception_from_meta(["not", "a", "map"])  # type: ignore[arg-type]


def test_result_compression_marker_both_ways(app: Celery) -> None:
    writer = _celery_backend(app, result_compression="zlib")
    writer.store_result("t-c", {"big": "x" * 500}, "SUCCESS")
    raw = writer.get(writer.get_key_for_task("t-c"))
    assert raw.startswith(COMPRESSED_RESULT_MARKER + b"application/x-gzip\x00")
    assert decode_meta(raw).result == {"big": "x" * 500}

    record = ResultRecord("t-d", State.SUCCESS, [1, 2, 3], date_done=dt.datetime.now(UTC))
    ours = encode_meta(record, compression="bzip2")
    assert ours.startswith(COMPRESSED_RESULT_MARKER + b"application/x-bz2\x00")
    assert writer.decode_result(ours)["result"] == [1, 2, 3]
    plain_reader = _celery_backend(app, result_compression=None)
    assert plain_reader.decode_result(ours)["result"] == [1, 2, 3]


def test_bad_compressed_result_payloads_are_decode_errors() -> None:
    with pytest.raises(DecodeError):
        decode_meta(COMPRESSED_RESULT_MARKER + b"application/x-gzip")
    with pytest.raises(DecodeError):
        decode_meta(COMPRESSED_RESULT_MARKER + b"application/x-nope\x00abc")
    with pytest.raises(DecodeError):
        decode_meta(COMPRESSED_RESULT_MARKER + b"application/x-gzip\x00not zlib")


def test_result_accept_list_is_checked(app: Celery) -> None:
    record = ResultRecord("t", State.SUCCESS, 1)
    pickled = encode_meta(record, "pickle")
    with pytest.raises(ContentDisallowed):
        decode_meta(pickled, "pickle")
    assert decode_meta(pickled, "pickle", accept=["pickle"]).result == 1


def test_meta_shape_rules() -> None:
    record = ResultRecord("t", State.STARTED, {"pid": 1, "hostname": "h"})
    assert meta_from_record(record) == {
        "status": "STARTED",
        "result": {"pid": 1, "hostname": "h"},
        "traceback": None,
        "children": None,
        "date_done": None,
        "task_id": "t",
    }
    assert "task_id" not in meta_from_record(record, include_task_id=False)
    naive = ResultRecord("t", State.SUCCESS, date_done=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert meta_from_record(naive)["date_done"] == "2026-01-02T03:04:05+00:00"
    plus_two = dt.timezone(dt.timedelta(hours=2))
    shifted = ResultRecord(
        "t", State.SUCCESS, date_done=dt.datetime(2026, 1, 2, 5, tzinfo=plus_two)
    )
    assert meta_from_record(shifted)["date_done"] == "2026-01-02T03:00:00+00:00"


@pytest.mark.parametrize(
    "meta",
    [
        ["not", "a", "map"],
        {"status": "DONE", "task_id": "t"},
        {"status": "SUCCESS"},
        {"status": "SUCCESS", "task_id": "t", "date_done": "yesterday"},
        {"status": "SUCCESS", "task_id": "t", "children": "x"},
    ],
)
def test_bad_metas_are_decode_errors(meta: Any) -> None:
    with pytest.raises(DecodeError):
        record_from_meta(meta)


def test_mongo_style_meta_uses_the_document_id_and_native_datetimes() -> None:
    done = dt.datetime(2026, 1, 2, 3, 4, 5)  # BSON datetimes come back naive UTC
    record = record_from_meta({"_id": "m-1", "status": "SUCCESS", "result": 1, "date_done": done})
    assert record.task_id == "m-1"
    assert record.date_done == done.replace(tzinfo=UTC)
    assert dict(record.extended) == {}


# ================================================================================= groups


def test_group_meta_equals_celerys_saved_group(app: Celery) -> None:
    backend = _celery_backend(app)
    ids = ["a-1", "a-2", "a-3"]
    group = app.GroupResult("g-1", [app.AsyncResult(i) for i in ids])
    backend.save_group("g-1", group)
    raw = backend.get(backend.get_key_for_group("g-1"))
    assert json.loads(raw) == group_meta("g-1", ids)
    assert kombu_serialization.dumps(group_meta("g-1", ids), "json")[2] == raw
    parsed = group_from_meta(json.loads(raw))
    assert (parsed.group_id, parsed.task_ids) == ("g-1", tuple(ids))


def test_celery_restores_a_group_we_saved(app: Celery) -> None:
    backend = _celery_backend(app)
    _, _, body = kombu_serialization.dumps(group_meta("g-2", ["b-1", "b-2"]), "json")
    backend.set(backend.get_key_for_group("g-2"), body)
    restored = backend.restore_group("g-2")
    assert restored.id == "g-2"
    assert [r.id for r in restored.results] == ["b-1", "b-2"]


def test_group_shapes_and_errors() -> None:
    assert result_tuple("x") == [["x", None], None]
    mongo = group_from_meta({"result": ["a", "b"], "date_done": "2026-01-02T03:04:05+00:00"}, "g")
    assert (mongo.group_id, mongo.task_ids) == ("g", ("a", "b"))
    assert mongo.date_done == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    bare = group_from_meta([["g", None], [[["a", None], None]]])
    assert bare.task_ids == ("a",)
    with pytest.raises(DecodeError):
        group_from_meta({"result": ["a"]})  # no group id given
    with pytest.raises(DecodeError):
        group_from_meta({"result": [["g", None], [[1, 2]]]})
    with pytest.raises(DecodeError):
        group_from_meta({"result": 5})

"""Bad input never stops the worker and never costs another message.

Extends tests/runtime/test_worker_memory.py (one bad message of each common kind) with:

* a catalogue of malformed messages (body shapes, headers, encodings, compression, sizes,
  content types) published *between* good messages to one running worker: every bad one is
  dead-lettered with a log line naming its id (asserted with caplog); a refused one writes
  no result under the id it claims, an unknown task a FAILURE; every good one completes; the
  worker is still running;
* hypothesis: arbitrary bodies, content types and header values through the worker's own
  handling path (``Worker._process``): it never raises, and the delivery always ends settled
  (acked with a result, or dead-lettered), never held or lost;
* invalid URLs of every kind, for every scheme: a typed error, the password masked.

Runs on the memory broker and backend (no server); the per-broker runs of bad input are in
tests/faults/test_bad_input_brokers.py.
"""

from __future__ import annotations

import bz2
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.faults import record_figures

from conveyor import App, Envelope
from conveyor.core.errors import (
    ConfigurationError,
    InvalidReceipt,
    InvalidURL,
    MissingDependency,
    UnknownScheme,
)
from conveyor.core.registry import broker_from_url, result_backend_from_url
from conveyor.runtime.worker import Worker
from conveyor.testing.support import eventually

GOOD_TASK = "bad.ok"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
MAX_SIZE = 64 * 1024


def _headers(task_id: str, **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": GOOD_TASK, "id": task_id, "retries": 0, **extra}


def _raw(task_id: str, body: bytes, content_type: str = "application/json", **kw: Any) -> Envelope:
    headers = kw.pop("headers", None) or _headers(task_id)
    return Envelope(
        id=task_id,
        body=body,
        content_type=content_type,
        content_encoding=kw.pop("content_encoding", "utf-8"),
        headers=headers,
        correlation_id=task_id,
        **kw,
    )


def _bad_catalogue() -> list[tuple[str, Envelope]]:
    """(kind, envelope) for every kind of malformed message the worker must dead-letter."""
    good_body = json.dumps([[1], {}, EMBED]).encode()
    cases: list[tuple[str, bytes, str, dict[str, Any]]] = [
        ("random-bytes", bytes(range(256)), "application/json", {}),
        ("empty-body", b"", "application/json", {}),
        ("truncated-json", good_body[:-7], "application/json", {}),
        ("two-item-body", b"[[1], {}]", "application/json", {}),
        ("four-item-body", json.dumps([[1], {}, EMBED, 4]).encode(), "application/json", {}),
        # a map body under v2 headers is Celery's "hybrid" form (valid); with bad fields it is not
        ("hybrid-bad-args", b'{"args": 5, "kwargs": []}', "application/json", {}),
        ("string-body", b'"hello"', "application/json", {}),
        ("null-body", b"null", "application/json", {}),
        ("args-not-a-list", json.dumps([5, {}, EMBED]).encode(), "application/json", {}),
        ("kwargs-not-a-map", json.dumps([[1], [2], EMBED]).encode(), "application/json", {}),
        ("embed-not-a-map", json.dumps([[1], {}, 7]).encode(), "application/json", {}),
        ("nan-and-garbage", b"[NaN, {}, ]", "application/json", {}),
        ("invalid-utf8", b'[["\xff\xfe"], {}, {}]', "application/json", {}),
        ("unknown-content-type", good_body, "application/xml", {}),
        ("empty-content-type", good_body, "", {}),
        ("pickle-not-accepted", b"\x80\x04K\x01.", "application/x-python-serialize", {}),
        ("yaml-not-accepted", b"- [1]\n- {}\n- {}\n", "application/x-yaml", {}),
        ("msgpack-not-accepted", b"\x93\x91\x01\x80\x80", "application/x-msgpack", {}),
        ("unknown-compression", good_body, "application/json", {"compression": "lz77"}),
        ("bad-zlib-data", b"not zlib at all", "application/json",
         {"compression": "application/x-gzip"}),
        ("non-string-compression", good_body, "application/json", {"compression": 5}),
        # 70 MB of JSON in ~100 bytes: refused by the 64 MB decompression limit, not decoded
        ("zip-bomb", bz2.compress(b"[" + b" " * (70 << 20) + b"]"), "application/json",
         {"compression": "application/x-bz2"}),
        ("bad-eta", good_body, "application/json", {"eta": "next tuesday"}),
        ("bad-expires", good_body, "application/json", {"expires": "soon"}),
        ("unknown-task", good_body, "application/json", {"task": "bad.nobody_knows"}),
        ("huge-message", b"[[" + b'"x",' * (MAX_SIZE // 4) + b'"x"], {}, {}]',
         "application/json", {}),
    ]  # fmt: skip
    out = []
    for kind, body, content_type, extra_headers in cases:
        task_id = f"bad-{kind}-{uuid.uuid4().hex[:8]}"
        headers = _headers(task_id, **extra_headers)
        out.append((kind, _raw(task_id, body, content_type, headers=headers)))
    # protocol v1 (no task header): the body is all there is
    v1 = f"bad-v1-garbage-{uuid.uuid4().hex[:8]}"
    out.append(("v1-garbage", _raw(v1, b'{"task": 5, "id": [], "args": "x"}', headers={})))
    return out


@pytest.fixture
def app() -> Iterator[App]:
    application = App(
        "bad",
        broker="memory://",
        backend="memory://",
        # long leases: decompressing the bz2 bomb up to its limit can take seconds under load
        worker_lease_seconds=30.0,
        worker_max_message_size=MAX_SIZE,
    )
    yield application
    application.close()


def test_every_kind_of_bad_message_is_dead_lettered_and_no_good_one_is_lost(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    done: list[int] = []
    lock = threading.Lock()

    @app.task(name=GOOD_TASK)
    def ok(n: int) -> int:
        with lock:
            done.append(n)
        return n

    bad = _bad_catalogue()
    good = []
    # good, bad, good, bad, ... good: every bad message sits between two good ones
    for i, (_, envelope) in enumerate(bad):
        good.append(ok.apply_async((i,), queue="celery"))
        app.broker.publish(envelope, queue="celery")
    good.append(ok.apply_async((len(bad),), queue="celery"))

    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    worker = app.Worker(pool="threads", concurrency=2, receive_timeout=0.1)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert worker.wait_started(10)
        assert sorted(r.get(timeout=30) for r in good) == list(range(len(bad) + 1))
        dlq = app.broker.dead_letter_queue("celery")
        eventually(lambda: app.broker.size(dlq) == len(bad), 15, message="all bad dead-lettered")
        assert thread.is_alive()
        # the worker still takes new work after all that
        assert ok.delay(-1).get(timeout=10) == -1
    finally:
        worker.stop()
        thread.join(15)
    assert worker.stats["dead_lettered"] == len(bad)
    assert app.broker.size("celery") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "conveyor.worker"]
    for kind, envelope in bad:
        said = [line for line in lines if f"dead-lettering message {envelope.id}" in line]
        assert said, f"no log line for {kind}"
        # refused (undecodable, too large, disallowed): no result under the id it claims;
        # an unknown task in a readable message: a FAILURE says why
        expected = "FAILURE" if kind == "unknown-task" else "PENDING"
        assert app.AsyncResult(envelope.headers.get("id") or envelope.id).state == expected, kind
    record_figures(
        "bad-input/memory-catalogue", kind="bad-input", broker="memory", bad_inputs=len(bad),
        moved=len(good) + 1, lost=0, dead_lettered=len(bad), duplicated=0,
    )  # fmt: skip


# ------------------------------------------------------------------ hypothesis: _process

_header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
_header_keys = st.sampled_from(
    ["task", "id", "eta", "expires", "retries", "timelimit", "root_id", "parent_id", "group",
     "group_index", "compression", "argsrepr", "kwargsrepr", "origin", "ignore_result",
     "lang", "stamps", "stamped_headers", "shadow", "replaced_task_nesting"]
)  # fmt: skip
_content_types = st.sampled_from(
    ["application/json", "application/x-python-serialize", "application/x-yaml",
     "application/x-msgpack", "text/plain", "", "application/data", "application/json; x"]
)  # fmt: skip


def _body_strategy() -> st.SearchStrategy[bytes]:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=10,
    )
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(json_values, json_values, json_values).map(lambda t: json.dumps(t).encode()),
        st.binary(max_size=200).map(lambda b: json.dumps([[1], {}, EMBED]).encode()[: len(b)]),
    )


FUZZ_EXAMPLES = 300


def test_the_worker_settles_any_message_without_raising(app: App) -> None:
    """Arbitrary bodies, content types and header values through ``Worker._process``."""
    tried = 0

    @app.task(name=GOOD_TASK)
    def ok(*args: Any, **kwargs: Any) -> str:
        return "ran"

    @settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
    @given(
        body=_body_strategy(),
        content_type=_content_types,
        headers=st.dictionaries(_header_keys, _header_values, max_size=8),
        keep_task=st.booleans(),
    )
    def check(body: bytes, content_type: str, headers: dict[str, Any], keep_task: bool) -> None:
        nonlocal tried
        tried += 1
        if keep_task:
            headers = {**headers, "task": GOOD_TASK}
        queue = f"fuzz-{uuid.uuid4().hex[:8]}"
        envelope = Envelope(
            id=str(uuid.uuid4()), body=body, content_type=content_type, headers=headers
        )
        broker = app.broker
        broker.declare_queue(queue)
        broker.publish(envelope, queue=queue)
        (delivery,) = broker.receive(queue, timeout=1.0)
        worker = Worker(app, queues=[queue], pool="solo")
        worker._process(delivery)  # must not raise, whatever the message
        # settled: acked (ran, failed, revoked, or deferred: republished with its delay) or
        # dead-lettered; never left held, never raised
        assert sum(worker.stats.values()) >= 1, dict(worker.stats)
        assert worker.stats["deferred"] or broker.size(queue) == 0
        with pytest.raises(InvalidReceipt):
            broker.extend(delivery, 1.0)

    check()
    record_figures(
        "bad-input/memory-fuzz", kind="bad-input", broker="memory", bad_inputs=tried,
        moved=0, lost=0, duplicated=0,
    )  # fmt: skip


# ------------------------------------------------------------------ invalid URLs

PASSWORD = "s3cr:t/p@ss#word?"
ENCODED = "s3cr%3At%2Fp%40ss%23word%3F"

INVALID = [
    # (url, error type)
    ("", InvalidURL),
    ("   ", InvalidURL),
    ("localhost:6379", InvalidURL),
    ("redis:/localhost", InvalidURL),
    ("ampq://guest:guest@localhost//", UnknownScheme),
    ("reddis://localhost:6379/0", UnknownScheme),
    ("postgresql://u@localhost/db", UnknownScheme),
    ("psycopg2://u:p@h/db", UnknownScheme),
    ("https://example.invalid/", UnknownScheme),
    ("redis://localhost:99999/0", InvalidURL),
    ("redis://localhost:port/0", InvalidURL),
    ("redis://localhost:/0", InvalidURL),
    ("redis://localhost:6379/notadb", ConfigurationError),
    ("redis://localhost:6379/0?socket_timeot=3", ConfigurationError),
    ("amqp://guest:guest@localhost:0//", InvalidURL),
    ("amqp://guest:guest@[::1//", InvalidURL),
    ("amqp://guest:guest@localhost//?heartbeet=3", ConfigurationError),
    ("mongodb://localhost:70000/db", ConfigurationError),
    ("sqla+", ConfigurationError),
    ("sqla+nosuchdialect://u@h/db", ConfigurationError),
    ("sqla+postgresql+psycopg://u@h:notaport/db", ConfigurationError),
    ("db+sqlite:///x.db?pool_sise=3", ConfigurationError),
    ("cache+memcached://", ConfigurationError),
    ("cache+memcached://h1:11211;h2:xx/", ConfigurationError),
    ("redis://h1 h2:6379/0", ConfigurationError),
]


@pytest.mark.parametrize(("url", "error"), INVALID, ids=[u or "empty" for u, _ in INVALID])
def test_invalid_urls_raise_a_typed_configuration_error(url: str, error: type[Exception]) -> None:
    for kind, build in (("broker", broker_from_url), ("backend", result_backend_from_url)):
        try:
            made = build(url)
        except MissingDependency:
            continue  # a driver this env does not install: also a typed error
        except ConfigurationError as exc:
            # The backend side may refuse earlier and for another reason (``amqp://`` is no
            # result backend): any ConfigurationError is typed enough there.
            caught = exc
        else:
            made.close()
            if kind == "broker":
                pytest.fail(f"{url!r} was accepted as a broker URL")
            continue
        if kind == "broker":
            assert isinstance(caught, error), (type(caught), caught)


def test_unknown_schemes_suggest_the_closest_and_list_the_known_ones() -> None:
    with pytest.raises(UnknownScheme) as info:
        broker_from_url("ampq://guest:guest@localhost//")
    assert info.value.suggestion == "amqp"
    assert "redis" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{PASSWORD}@127.0.0.1:1/0",
        f"redis://:{ENCODED}@127.0.0.1:1/0",
        f"amqp://guest:{PASSWORD}@127.0.0.1:1//",
        f"sqla+postgresql+psycopg://u:{ENCODED}@127.0.0.1:1/db",
        f"mongodb://u:{ENCODED}@127.0.0.1:1/db",
        f"redis://user:{PASSWORD}@127.0.0.1:port/0",
        f"ampq://guest:{PASSWORD}@localhost//",
        f"redis://user:{PASSWORD}@127.0.0.1:99999/0",
    ],
)
def test_special_characters_in_passwords_never_leak_into_errors_or_reprs(url: str) -> None:
    texts: list[str] = []
    for build in (broker_from_url, result_backend_from_url):
        try:
            made = build(url, **({"socket_connect_timeout": 0.2} if "redis" in url else {}))
        except ConfigurationError as exc:
            texts.append(str(exc))
            continue
        except Exception as exc:  # a driver error from connecting: must be ours and masked
            texts.append(f"{type(exc).__name__}: {exc}")
            continue
        texts.append(repr(made))
        made.close()
    for text in texts:
        for secret in (PASSWORD, ENCODED, "s3cr"):
            assert secret not in text, text

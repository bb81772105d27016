"""Real Celery 5.7 (its cache backend on pymemcache) and conveyor share memcached results.

The scenarios every store shares (Celery writes / a real Celery worker runs / conveyor
writes, SUCCESS is final either way) are :class:`result_compat.CeleryResultCompat`'s, run
here on memcached; this file adds what is memcached's own:

* conveyor's values carry Celery's key, flags (0) and document layout.
* With two servers (``cache+memcached://h1;h2/``) both sides put every key on the same
  server (pymemcache's rendezvous hashing), so each reads all of the other's results.

Server: ``CONVEYOR_TEST_MEMCACHED_URL`` (``tests/support/memcached.py``); the second server is
started by the test. Skips without Celery.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.result import AsyncResult
from pymemcache.client.base import Client
from result_compat import TIMEOUT, UTC, CeleryResultCompat, celery_app
from support.memcached import extra_memcached, memcached_url, raw_command  # noqa: F401

from conveyor.backends.memcached import MemcachedResultBackend, _parse_servers
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name


class TestCeleryMemcachedResults(CeleryResultCompat):
    backend_class = MemcachedResultBackend
    reads_extended = False  # conveyor's memcached backend keeps no result_extended fields
    celery_groups_have_date_done = False  # Celery's cache backend saves {"result": ...} only

    @pytest.fixture
    def result_url(self, memcached_url: str) -> str:  # noqa: F811
        return memcached_url

    def test_conveyor_values_have_celerys_key_flags_and_document(
        self,
        app: Celery,
        ours: MemcachedResultBackend,
        memcached_url: str,  # noqa: F811
    ) -> None:
        ours_id, celery_id = unique_name("ours-raw"), unique_name("celery-raw")
        ours.store(ResultRecord(ours_id, State.SUCCESS, {"a": 1}, date_done=datetime.now(UTC)))
        app.backend.store_result(celery_id, {"a": 1}, "SUCCESS")
        (host, port), *_ = _parse_servers(memcached_url)[0]
        for task_id in (ours_id, celery_id):
            header = raw_command(host, port, f"get celery-task-meta-{task_id}")
            assert header.startswith(f"VALUE celery-task-meta-{task_id} 0 "), header  # flags 0
        client = Client((host, port))
        try:
            mine = json.loads(client.get(f"celery-task-meta-{ours_id}"))
            theirs = json.loads(client.get(f"celery-task-meta-{celery_id}"))
        finally:
            client.close()
        assert list(mine) == list(theirs)  # same keys in the same order
        assert mine["task_id"] == ours_id
        assert {k: mine[k] for k in ("status", "result", "traceback", "children")} == {
            k: theirs[k] for k in ("status", "result", "traceback", "children")
        }

    def test_with_two_servers_both_sides_find_every_result_of_the_other(
        self,
        memcached_url: str,  # noqa: F811
        extra_memcached: tuple[str, int],  # noqa: F811
    ) -> None:
        (first, _query) = _parse_servers(memcached_url)
        host, port = first[0]
        extra_host, extra_port = extra_memcached
        url = f"cache+memcached://{host}:{port};{extra_host}:{extra_port}/"
        app = celery_app(url)
        ours = MemcachedResultBackend.from_url(url)
        try:
            mine = [unique_name("ours-multi") for _ in range(40)]
            theirs = [unique_name("celery-multi") for _ in range(40)]
            for task_id in mine:
                ours.store(
                    ResultRecord(task_id, State.SUCCESS, task_id, date_done=datetime.now(UTC))
                )
            for task_id in theirs:
                app.backend.store_result(task_id, task_id, "SUCCESS")
            assert [AsyncResult(t, app=app).get(timeout=TIMEOUT) for t in mine] == mine
            found = ours.fetch_many(theirs)
            assert [found[t].result for t in theirs] == theirs
            # The keys really are spread over both servers.
            on_extra = [
                t
                for t in mine + theirs
                if raw_command(extra_host, extra_port, f"get celery-task-meta-{t}").startswith(
                    "VALUE"
                )
            ]
            assert 0 < len(on_extra) < len(mine + theirs)
        finally:
            ours.close()
            app.close()

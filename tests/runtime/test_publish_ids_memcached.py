"""A task id memcached cannot hold as a key (a space, a control character, over 250 bytes
with its prefix) is refused by ``apply_async`` when the message wants a result, before
anything is published (issue 13, item 4); without a result it is sent."""

from __future__ import annotations

import pytest
from support.memcached import memcached_url  # noqa: F401 - fixture

from conveyor import App
from conveyor.core.errors import ConfigurationError


@pytest.mark.parametrize("bad", ["has space", "tab\there", "x" * 240], ids=["space", "tab", "long"])
def test_a_task_id_memcached_cannot_hold_is_refused_at_apply_async(
    memcached_url: str,  # noqa: F811
    bad: str,
) -> None:
    app = App("ids", broker="memory://", backend=memcached_url)
    try:
        with pytest.raises(ConfigurationError, match="memcached"):
            app.send_task("t", task_id=bad)
        assert app.broker.size("celery") == 0
        app.send_task("t", task_id=bad, ignore_result=True)
        assert app.broker.size("celery") == 1
    finally:
        app.close()

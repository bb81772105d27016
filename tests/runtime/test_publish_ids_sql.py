"""A task id the SQL result backend cannot hold (Celery's 155-character column) is refused
by ``apply_async`` when the message wants a result, before anything is published, on every
selected database (issue 13, item 4); without a result it is sent (the broker holds it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.sql import SqlTarget, make_target, sql_target_params

from conveyor import App
from conveyor.core.errors import ConfigurationError


@pytest.fixture(params=sql_target_params(memory=False))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    return make_target(request.param, tmp_path)


def test_a_task_id_longer_than_the_sql_column_is_refused_at_apply_async(
    target: SqlTarget,
) -> None:
    app = App("ids", broker="memory://", backend=f"db+{target.url}")
    try:
        with pytest.raises(ConfigurationError, match="155"):
            app.send_task("t", task_id="x" * 156)
        with pytest.raises(ConfigurationError, match="group id refused"):
            app.send_task("t", group_id="g" * 156)
        assert app.broker.size("celery") == 0
        app.send_task("t", task_id="x" * 155, group_id="g" * 155)
        app.send_task("t", task_id="x" * 156, ignore_result=True)
        assert app.broker.size("celery") == 2
    finally:
        app.close()

"""Issue 13 on the SQL result backend: a result larger than MariaDB's ``max_allowed_packet``
is refused with ``EncodeError`` before it is sent (the server would drop the connection: a
"gone away" read as a transient outage, retried for ever); the backend serves on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.sql import MYSQL_URL, selected

from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.core.errors import EncodeError
from conveyor.core.types import ResultRecord, State
from conveyor.testing.support import unique_name

pytestmark = pytest.mark.skipif("mysql" not in selected(), reason="MariaDB/MySQL only")


@pytest.fixture
def backend() -> Iterator[SQLAlchemyResultBackend]:
    made = SQLAlchemyResultBackend.from_url(f"db+{MYSQL_URL}")
    yield made
    made.close()


def test_a_result_over_max_allowed_packet_is_an_encode_error_and_the_backend_serves_on(
    backend: SQLAlchemyResultBackend,
) -> None:
    with backend.engine.connect() as conn:
        packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
    big = unique_name("big")
    with pytest.raises(EncodeError, match="max_allowed_packet"):
        backend.store(ResultRecord(big, State.SUCCESS, "x" * (packet + 1024)))
    assert backend.fetch(big) is None  # nothing was written
    small = unique_name("small")
    backend.store(ResultRecord(small, State.SUCCESS, "x" * (packet // 4)))
    record = backend.fetch(small)
    assert record is not None
    assert record.result == "x" * (packet // 4)
    backend.forget(small)

"""SQLAlchemy plumbing shared by the ``sqla+`` broker (:mod:`conveyor.transports.sqlalchemy`)
and the ``db+`` result backend (:mod:`conveyor.backends.sqlalchemy`). Private.

It owns the things both implementations must do identically:

* :mod:`.urls`: splitting a ``sqla+<url>`` / ``db+<url>`` into the SQLAlchemy URL and
  conveyor's options (:func:`split_url`; the driver's own keys pass through, typos are
  refused);
* :mod:`.engine`: the engine options both take (:class:`EngineSettings`,
  :func:`engine_settings`) and one long-lived engine per instance with the settings each
  dialect needs (:func:`make_database`), wrapped in :class:`Database`, which runs a
  transaction with a bounded, jittered retry of deadlocks and serialization failures;
* :mod:`.errors`: every remaining driver error translated in ONE place,
  :func:`translate_error` and :func:`translating`, chained with ``from``;
* :mod:`.packet`: the MariaDB/MySQL ``max_allowed_packet`` guard;
* :mod:`.schema`: table, schema and index names, race-safe ``create_all``.
"""

from __future__ import annotations

from conveyor._drivers.sql.engine import (
    SQLITE_BEGIN,
    Database,
    EngineSettings,
    engine_settings,
    make_database,
)
from conveyor._drivers.sql.errors import is_retryable, translate_error, translating
from conveyor._drivers.sql.schema import (
    create_all_race_safe,
    index_name,
    sql_identifier,
    tables_exist,
)
from conveyor._drivers.sql.urls import driver_query_keys, split_url

__all__ = [
    "SQLITE_BEGIN",
    "Database",
    "EngineSettings",
    "create_all_race_safe",
    "driver_query_keys",
    "engine_settings",
    "index_name",
    "is_retryable",
    "make_database",
    "split_url",
    "sql_identifier",
    "tables_exist",
    "translate_error",
    "translating",
]

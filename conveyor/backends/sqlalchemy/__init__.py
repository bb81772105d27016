"""SQL result backend on SQLAlchemy, in Celery 5.7's own tables (``db+<url>``).

Capabilities:
    ``expiry_sweep`` (an indexed ``expires_at`` column; :meth:`purge_expired` deletes in
    short batches; expired rows are never returned, swept or not), ``groups``
    (``celery_tasksetmeta``), ``counters`` (atomic ``incr`` and idempotent ``add_member`` in
    ``conveyor_counter``), ``multi_reader``, ``durable``, ``cross_process`` (SQLite
    ``:memory:`` excepted: one process). Not ``wait``: readers poll
    (:func:`conveyor.core.wait_for`). Not ``native_ttl``: SQL has no row TTL.

URL:
    ``db+<SQLAlchemy URL>`` or ``database+<SQLAlchemy URL>``, Celery's spelling:
    ``db+sqlite:///results.db``, ``db+postgresql+psycopg://user:pass@host/db``,
    ``db+mysql+pymysql://user:pass@host/db``. Query keys that are options (below) are removed
    before the URL reaches SQLAlchemy; others go to the driver.

Options (keyword > URL query > default; :class:`SQLAlchemyResultBackendOptions`):
    ``default_ttl`` (86400.0: Celery's ``result_expires``), ``serializer`` (``json``:
    Celery's ``result_serializer``), ``accept`` (serializers ``fetch`` decodes; default: the
    serializer alone), ``task_table`` (``celery_taskmeta``), ``group_table``
    (``celery_tasksetmeta``), ``counter_table`` (``conveyor_counter``), ``schema``,
    ``create_tables`` (True), ``max_retries`` (10) and the engine settings of the SQL broker
    (``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_recycle``,
    ``connect_timeout``, ``operation_timeout``, ``sqlite_synchronous``, ``echo``).

Thread-safety:
    One instance may be shared by the threads of one process (each call takes a pooled
    connection). Build a new instance after ``fork()``.

Celery compatibility (``docs/celery-compat.md#sql-result-tables``,
``docs/stores/sql.md``):

* The tables have Celery 5.7's columns, names and meanings: ``task_id`` unique, ``status``,
  ``result`` = the result (or the exception document) encoded with the result serializer,
  ``date_done`` naive UTC (set for ready states), ``traceback``, ``children`` (encoded, NULL
  when absent), the ``result_extended`` columns ``name``/``args``/``kwargs``/``worker``/
  ``retries``/``queue``/``stamps`` (Celery 5.7 always creates them; we fill them from
  ``ResultRecord.extended``), ids from the sequences ``task_id_sequence`` /
  ``taskset_id_sequence`` on PostgreSQL. Group rows hold the encoded group tuple
  ``[[gid, null], [[[task_id, null], null], ...]]``.
* Three nullable columns are ours: ``expires_at`` (indexed; Celery ignores it), ``group_id``
  and ``parent_id`` (Celery's SQL backend drops them; we keep them). An existing Celery table
  gets them with ``ALTER TABLE ... ADD COLUMN`` on first use (as Celery 5.7 itself adds
  ``children``/``stamps`` to older tables). Rows Celery writes have ``expires_at`` NULL and
  expire ``default_ttl`` after ``date_done``, exactly like Celery's ``backend_cleanup``;
  non-ready rows Celery writes (NULL ``date_done``) never expire, as in Celery.
* On MariaDB/MySQL the binary and text columns are ``LONGBLOB``/``LONGTEXT`` and times
  ``DATETIME(6)`` (Celery's defaults, ``BLOB`` and ``DATETIME``, cap results at 64 KiB and
  drop sub-second times); Celery reads both layouts the same way.
* A stored SUCCESS is never overwritten, in ONE statement: ``INSERT ... ON CONFLICT DO
  UPDATE ... WHERE status <> 'SUCCESS'`` (PostgreSQL, SQLite) or ``ON DUPLICATE KEY UPDATE``
  with ``IF(status = 'SUCCESS', old, new)`` (MariaDB/MySQL).
* Times: the client clock (as Celery's ``date_done`` and ``cleanup``), stored as naive UTC.

Ids (:meth:`SQLAlchemyResultBackend.validate_task_id`):

* The rules of :func:`conveyor.core.base.check_id` (a non-empty ``str``, no NUL -- PostgreSQL
  text cannot hold it --, valid UTF-8), and at most 155 characters for task and group ids
  (Celery's ``String(155)`` columns, also ``group_id``/``parent_id`` of a record), the same
  for counter keys and members (one rule for every id). Checked on every method before any
  statement runs: a refused id raises ``ConfigurationError``, never a database error (an
  ``int`` would compare as a number in MySQL and match ``'5abc...'``).
* MariaDB/MySQL compare ``VARCHAR`` values ignoring trailing spaces (PAD SPACE), so an id
  ending in a space is refused there. Tables created here use the ``utf8mb4_bin`` collation
  for ids (exact: ``'ABC'`` and ``'abc'`` are two ids). A table created with a
  case-insensitive collation (Celery's, the server default ``utf8mb4_general_ci``) is still
  read exactly (reads and deletes also compare the bytes), and a store whose id collides
  with another id under that collation is refused with ``ConfigurationError`` naming the fix
  (``ALTER TABLE ... COLLATE utf8mb4_bin``) instead of overwriting the other task's row.
  conveyor's own counter table is converted to ``utf8mb4_bin`` on first use.

Other columns: the ``name``/``worker``/``queue`` columns (``String(155)``, informational)
keep their first 155 characters; text columns (those three and ``traceback``) escape NUL and
lone surrogates (``\\x00``, ``\\udc80``), which no SQL text type holds; ``retries`` outside a
32-bit int raises ``EncodeError``. A ttl reaching past the year 9999 means "never expires".

Modules: :mod:`.backend` (the result backend), :mod:`.tables` (Celery's tables and
conveyor's counter table), :mod:`.ids` (ids and column values: lengths, collations, exact
comparison), :mod:`.options`; the URL, engine and error plumbing it shares with the SQL
broker is :mod:`conveyor._drivers.sql`.
"""

from __future__ import annotations

from conveyor.backends.sqlalchemy.backend import SQLAlchemyResultBackend
from conveyor.backends.sqlalchemy.options import SQLAlchemyResultBackendOptions
from conveyor.backends.sqlalchemy.tables import counter_table, group_table, task_table

__all__ = [
    "SQLAlchemyResultBackend",
    "SQLAlchemyResultBackendOptions",
    "counter_table",
    "group_table",
    "task_table",
]

"""Options of the SQL result backend (documented in :mod:`conveyor.backends.sqlalchemy`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from conveyor._drivers.sql import (
    EngineSettings,
    engine_settings,
    sql_identifier,
)
from conveyor.core.base import DEFAULT_RESULT_TTL, check_default_ttl
from conveyor.core.errors import (
    ConfigurationError,
)

__all__ = ["OPTION_NAMES", "SQLAlchemyResultBackendOptions"]


@dataclass(frozen=True)
class SQLAlchemyResultBackendOptions(EngineSettings):
    """Options of :class:`SQLAlchemyResultBackend` (seconds as float).

    Attributes:
        default_ttl: lifetime of a record, group or counter stored with ``ttl=None``; also
            the lifetime after ``date_done`` of rows Celery wrote. ``None``/0: forever
            (explicit configuration only).
        serializer: result serializer name (Celery's ``result_serializer``).
        accept: serializers ``fetch`` may decode; empty means ``(serializer,)``. A
            pre-5.7 pickled row decodes only when ``pickle`` is accepted.
        task_table, group_table: Celery's ``database_table_names`` ``task`` / ``group``.
        counter_table: conveyor's counter table.
        schema: database schema for all three, or None.
        create_tables: create missing tables (and add our columns) on first use.
        max_retries: attempts for transactions that hit deadlocks/serialization failures.
        Others: engine settings, as for the SQL broker.
    """

    default_ttl: float | None = DEFAULT_RESULT_TTL
    serializer: str = "json"
    accept: tuple[str, ...] = ()
    task_table: str = "celery_taskmeta"
    group_table: str = "celery_tasksetmeta"
    counter_table: str = "conveyor_counter"
    schema: str | None = None
    create_tables: bool = True
    max_retries: int = 10

    def __post_init__(self) -> None:
        check_default_ttl(self.default_ttl)
        if self.max_retries < 1:
            raise ConfigurationError("max_retries must be >= 1")
        for name in ("task_table", "group_table", "counter_table"):
            sql_identifier(getattr(self, name), name)
        if self.schema is not None:
            sql_identifier(self.schema, "schema")

    def engine_settings(self) -> EngineSettings:
        """The engine knobs alone (inherited from :class:`EngineSettings`)."""
        return engine_settings(self)


OPTION_NAMES = frozenset(f.name for f in fields(SQLAlchemyResultBackendOptions))

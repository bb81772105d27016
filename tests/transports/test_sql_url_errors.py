"""Errors about SQL URLs (``conveyor._drivers.sql``) show no secret and are conveyor's own
(issue 13, item 5): SQLAlchemy's and the drivers' text goes through ``mask_text``, a raw
``?``/``#`` in credentials is refused before SQLAlchemy reads it, and a query value the
dialect cannot convert is a ``ConfigurationError``, not a raw ``ValueError``."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from conveyor._drivers.sql import EngineSettings, make_database, split_url
from conveyor.core.errors import ConfigurationError, InvalidURL
from conveyor.core.registry import broker_from_url, result_backend_from_url

MARK = "QZ"


@pytest.mark.parametrize(
    "url",
    [f"sqla+postgresql+psycopg://u:pa?{MARK}1@h/db", f"sqla+sqlite://u:pa#{MARK}2@h/x.db"],
)
def test_a_raw_question_mark_or_hash_in_credentials_is_refused_before_sqlalchemy_reads_it(
    url: str,
) -> None:
    with pytest.raises(InvalidURL, match="percent-encode") as info:
        split_url(url, prefixes=("sqla",), option_names=())
    assert MARK not in str(info.value)


@pytest.mark.parametrize("query", ["timeout=abc", "check_same_thread=maybe"], ids=["float", "bool"])
def test_a_query_value_the_dialect_cannot_convert_is_a_configuration_error(query: str) -> None:
    url = f"sqlite:///x.db?{query}"
    with pytest.raises(ConfigurationError, match="cannot build an engine"):
        make_database(make_url(url), url_text=url, settings=EngineSettings(), max_retries=1)


@pytest.mark.parametrize("factory", [broker_from_url, result_backend_from_url])
def test_building_from_a_sql_url_with_a_bad_value_shows_no_password(factory: object) -> None:
    scheme = "sqla+sqlite" if factory is broker_from_url else "db+sqlite"
    url = f"{scheme}://u:{MARK}4@/x.db?timeout=soon"
    with pytest.raises(ConfigurationError) as info:
        factory(url)  # type: ignore[operator]
    assert MARK not in str(info.value)

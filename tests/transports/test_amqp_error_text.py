"""AMQP error texts are masked (issue 13, item 5): ``translate_error`` passes pika's and the
socket's text through ``mask_text`` (it may quote connection parameters), and
``redact_url`` hides what ``mask_url`` hides."""

from __future__ import annotations

import pika.exceptions
import pytest

from conveyor._drivers.amqp.errors import translate_error, translating
from conveyor.core.errors import ConfigurationError, ConnectionLost, OperationalError
from conveyor.core.urls import mask_url
from conveyor.transports.amqp import redact_url

SECRET = "QZs3cr3t"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (pika.exceptions.AMQPConnectionError(f"amqp://u:{SECRET}@h// refused"), ConnectionLost),
        (OSError(f"connect(password={SECRET!r}) failed"), ConnectionLost),
        (
            pika.exceptions.ProbableAuthenticationError(f"user u password={SECRET}"),
            ConfigurationError,
        ),
        (pika.exceptions.AMQPError(f"amqp://u:{SECRET}@h//"), OperationalError),
        (RuntimeError(f"token={SECRET}"), OperationalError),
    ],
    ids=["connection", "socket", "login", "amqp", "other"],
)
def test_translated_errors_show_no_secret(error: BaseException, kind: type) -> None:
    translated = translate_error(error, what="connecting")
    assert isinstance(translated, kind)
    assert SECRET not in str(translated)


def test_a_channel_closed_by_the_broker_shows_its_reply_masked() -> None:
    closed = pika.exceptions.ChannelClosedByBroker(406, f"PRECONDITION_FAILED password={SECRET}")
    translated = translate_error(closed, what="declare")
    assert isinstance(translated, ConfigurationError)
    assert "PRECONDITION_FAILED" in str(translated)
    assert SECRET not in str(translated)


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@rabbit//", f"amqp://u:{SECRET}@h1//;amqp://u:{SECRET}@h2//"]
)
def test_redact_url_hides_what_mask_url_hides(url: str) -> None:
    assert SECRET not in redact_url(url)
    assert "guest" not in redact_url(url)
    assert SECRET not in mask_url(url)


def test_translating_raises_the_translated_error_and_names_the_url_masked() -> None:
    url = f"amqp://guest:{SECRET}@localhost//"
    with pytest.raises(ConnectionLost) as info, translating("publish", url):
        raise pika.exceptions.AMQPConnectionError(f"refused password={SECRET}")
    assert str(info.value).startswith("publish on amqp://")
    assert SECRET not in str(info.value)
    assert isinstance(info.value.__cause__, pika.exceptions.AMQPConnectionError)
    own = OperationalError("already translated")
    with pytest.raises(OperationalError) as passed, translating("publish", url):
        raise own
    assert passed.value is own

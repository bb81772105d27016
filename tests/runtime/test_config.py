"""Celery-style configuration: names, precedence, did-you-mean warnings."""

from __future__ import annotations

import types

import pytest

from conveyor import App
from conveyor.core.errors import ConfigurationError
from conveyor.runtime.config import UnknownSettingWarning


def test_defaults_follow_celery() -> None:
    app = App("cfg")
    assert app.conf.task_default_queue == "celery"
    assert app.conf.result_expires == 86400.0
    assert app.conf.task_serializer == "json"
    assert tuple(app.conf.accept_content) == ("json",)


def test_update_and_attribute_access() -> None:
    app = App("cfg")
    app.conf.update(result_expires=60.0, task_default_queue="q1")
    assert app.conf.result_expires == 60.0
    assert app.conf["task_default_queue"] == "q1"
    app.conf.timezone = "Europe/Paris"
    assert app.conf.timezone == "Europe/Paris"


def test_unknown_setting_warns_with_did_you_mean() -> None:
    app = App("cfg")
    with pytest.warns(UnknownSettingWarning, match="result_expires"):
        app.conf.update(result_expire=10)


def test_config_from_object_reads_lowercase_settings() -> None:
    module = types.ModuleType("settings_mod")
    module.broker_url = "memory://"  # type: ignore[attr-defined]
    module.result_expires = 5.0  # type: ignore[attr-defined]
    module.NOT_A_SETTING = 1  # type: ignore[attr-defined]
    app = App("cfg")
    app.config_from_object(module)
    assert app.broker_url == "memory://"
    assert app.conf.result_expires == 5.0


def test_config_from_object_with_namespace() -> None:
    module = types.SimpleNamespace(CONVEYOR_BROKER_URL="memory://", CONVEYOR_TASK_SERIALIZER="json")
    app = App("cfg")
    app.config_from_object(module, namespace="CONVEYOR")
    assert app.conf.broker_url == "memory://"


def test_precedence_argument_then_environment_then_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "redis://env-host:6379/0")
    app = App("cfg", broker_url="redis://conf-host:6379/0")
    assert "env-host" in app.broker_url
    explicit = App("cfg", broker="memory://", broker_url="redis://conf-host:6379/0")
    assert explicit.broker_url == "memory://"
    monkeypatch.delenv("CONVEYOR_BROKER_URL")
    assert "conf-host" in App("cfg", broker_url="redis://conf-host:6379/0").broker_url


def test_no_broker_means_the_embedded_sqlite_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("CONVEYOR_BROKER_URL", raising=False)
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    app = App("cfg")
    assert app.broker_url.startswith("sqla+sqlite:///")
    assert app.result_backend_url.startswith("db+sqlite:///")
    assert app.uses_embedded_default


def test_empty_broker_url_is_an_error_not_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_BROKER_URL", raising=False)
    app = App("cfg", broker_url="  ")
    with pytest.raises(ConfigurationError, match="empty"):
        _ = app.broker_url


def test_app_repr_masks_the_password() -> None:
    app = App("cfg", broker="redis://user:s3cret-pass@host:6379/0")
    assert "s3cret-pass" not in repr(app)


def test_unknown_apply_async_option_is_refused() -> None:
    app = App("cfg", broker="memory://", backend="memory://")

    @app.task
    def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match="contdown"):
        f.apply_async(contdown=3)
    app.close()

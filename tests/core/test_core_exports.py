"""``conveyor.core`` exports the maskers an implementation needs to keep secrets out of its
errors, logs and reprs (issue 13, item 5), next to ``mask_url``; importing them needs no
driver."""

from __future__ import annotations

import conveyor.core as core
from conveyor.core import urls


def test_the_maskers_are_exported_by_conveyor_core() -> None:
    for name in ("mask_url", "mask_text", "mask_options", "is_secret_key"):
        assert name in core.__all__
        assert getattr(core, name) is getattr(urls, name)


def test_the_exported_maskers_hide_a_password() -> None:
    assert "hunter2" not in core.mask_text("connect failed: redis://u:hunter2@h/0")
    assert core.mask_options({"sentinel_kwargs": {"password": "hunter2"}}) == {
        "sentinel_kwargs": {"password": "***"}
    }
    assert core.is_secret_key("ssl_keyfile_password")

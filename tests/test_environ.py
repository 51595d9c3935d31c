"""environ.environment: names set or unset inside, every one back as it was after."""

from __future__ import annotations

import os

import pytest

from ssl_dist.environ import environment


def test_sets_and_unsets_inside_and_restores_after_an_error(monkeypatch):
    monkeypatch.setenv("SSL_DIST_T_SET", "before")
    monkeypatch.delenv("SSL_DIST_T_NEW", raising=False)
    with pytest.raises(RuntimeError), environment({"SSL_DIST_T_SET": None, "SSL_DIST_T_NEW": "inside"}):
        assert "SSL_DIST_T_SET" not in os.environ and os.environ["SSL_DIST_T_NEW"] == "inside"
        raise RuntimeError("the block fails")
    assert os.environ["SSL_DIST_T_SET"] == "before" and "SSL_DIST_T_NEW" not in os.environ

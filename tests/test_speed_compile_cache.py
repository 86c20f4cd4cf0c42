"""Inductor's cache beside the checkpoints (speed/compile_cache.py)."""

from __future__ import annotations

import os

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from ddpm_lightning.speed.compile_cache import VARIABLE, keep_compile_cache


def test_the_cache_goes_beside_the_checkpoints_unless_the_user_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv(VARIABLE)
    assert keep_compile_cache(str(tmp_path / "checkpoints" / "run")) == str(tmp_path / "checkpoints" / "compile-cache")
    assert os.environ[VARIABLE] == str(tmp_path / "checkpoints" / "compile-cache")
    monkeypatch.setenv(VARIABLE, default_cache_dir())  # as importing Lightning leaves it: not the user's choice
    assert keep_compile_cache(str(tmp_path / "run")) == str(tmp_path / "compile-cache")
    monkeypatch.setenv(VARIABLE, str(tmp_path / "mine"))
    assert keep_compile_cache(str(tmp_path / "other" / "run")) is None
    assert os.environ[VARIABLE] == str(tmp_path / "mine") and not (tmp_path / "other").exists()

"""Tests convert models and tokenizers only into the run's model cache, never into the user's ``~/.cache``.

``conftest.py`` points ``LOGITCACHE_MODEL_CACHE`` at a project-local folder; every conversion path must honour it:
``logitcache.models`` (GGUF -> HF folders, Gemma's assembly in a scratch folder inside it; see test_models.py) and
``logitcache.testing.tiny_tokenizers.real_tokenizer`` (GGUF tokenizers, checked here with ``HOME`` moved away so
that anything written under ``~`` shows up).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ci_helpers import need

from logitcache.models import model_cache_root
from logitcache.testing.tiny_tokenizers import (
    REAL_PACKAGES,
    real_tokenizer,
    real_tokenizer_available,
    real_tokenizer_cache,
)


def test_the_test_run_has_a_model_cache():
    assert os.environ.get("LOGITCACHE_MODEL_CACHE"), "conftest.py sets it for every test run"
    assert model_cache_root() == Path(os.environ["LOGITCACHE_MODEL_CACHE"]).expanduser()


def test_real_tokenizer_cache_follows_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("LOGITCACHE_TEST_CACHE", raising=False)
    monkeypatch.setenv("LOGITCACHE_MODEL_CACHE", str(tmp_path / "models"))
    assert real_tokenizer_cache() == tmp_path / "models" / "test-tokenizers"
    monkeypatch.setenv("LOGITCACHE_TEST_CACHE", str(tmp_path / "explicit"))
    assert real_tokenizer_cache() == tmp_path / "explicit"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_gguf_tokenizer_conversion_writes_nothing_under_home(name, tmp_path, monkeypatch):
    need(real_tokenizer_available(name), f"tokenizer {name!r} not installed; {REAL_PACKAGES[name][1]}")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LOGITCACHE_TEST_CACHE", raising=False)
    monkeypatch.setenv("LOGITCACHE_MODEL_CACHE", str(tmp_path / "models"))
    assert Path.home() == home  # precondition: ~ really is the scratch folder now
    tok = real_tokenizer.__wrapped__(name)  # past the per-process memo: convert for real
    assert len(tok) > 1000
    assert list(home.iterdir()) == []
    converted = list((tmp_path / "models" / "test-tokenizers").iterdir())
    assert [p.name.startswith(f"tokenizer-{name}-") for p in converted] == [True], converted
    assert (converted[0] / "tokenizer.json").is_file()

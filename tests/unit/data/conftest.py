"""Fixtures for kd.data tests: the tiny tokenizer, and a private `datasets` cache per test."""
from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from tests.helpers.tiny import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """Keep `datasets`' download/processing cache inside the test's tmp dir instead of ~/.cache."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    datasets.disable_progress_bars()
    return cache

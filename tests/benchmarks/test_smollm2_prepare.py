"""The SmolLM2 benchmark's ``prepare`` reads its text from the repository, so a clone runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def smollm2_model(monkeypatch):
    """``benchmarks/smollm2_model.py``, imported as the benchmark scripts import it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("smollm2_model")


def test_prepare_reads_the_novel_shipped_in_the_repository(smollm2_model):
    data_dir = smollm2_model.DEFAULT_DATA_DIR
    assert data_dir.is_relative_to(ROOT)
    novels = sorted(data_dir.glob("*.txt"))
    assert [novel.name for novel in novels] == ["emma.txt"]
    head, tail = smollm2_model.split_novel(novels[0].read_text(encoding="utf-8"))
    # The benchmark takes 32 + 16 windows of 512 tokens; Emma holds 389 + 43 of them (about
    # 4.5 characters a token), far more than these bounds ask.
    assert len(head) > 10 * 32 * 512 and len(tail) > 5 * 16 * 512


def test_prepare_names_a_folder_without_novels_before_loading_the_model(smollm2_model, tmp_path):
    cache_dir, empty = tmp_path / "cache", tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no .txt novels in {empty}.*--data-dir"):
        smollm2_model.prepare(cache_dir, empty)
    assert not cache_dir.exists()

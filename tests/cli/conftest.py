"""Fixtures of the command-line tests: a tiny checkpoint and JSONL files on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_checkpoints import (  # noqa: F401 (an autouse fixture)
    RECORDS,
    log_settings_restored,
    save_checkpoint,
    write_jsonl,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def jsonl(tmp_path) -> Callable[..., Path]:
    def write(name: str = "data.jsonl", texts: list[str] | None = None, column: str = "text"):
        return write_jsonl(tmp_path / name, texts or RECORDS, column)

    return write

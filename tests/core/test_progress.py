"""Block progress: a log line per block with its time, the mean and the time left; bars only
on a terminal."""

from __future__ import annotations

import io
import sys
import threading

import pytest
from loguru import logger
from tqdm import tqdm

from lightning_compress.core.progress import BlockProgress, format_duration, progress_bar


@pytest.fixture
def messages() -> list[str]:
    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(message.record["message"]), level="INFO")
    yield seen
    logger.remove(sink)


def test_each_block_logs_its_time_the_mean_and_the_time_left(messages):
    progress = BlockProgress(total=4)
    progress.block_done("model.layers.0", 2.0)
    progress.block_done("model.layers.1", 4.0)
    assert progress.seconds_per_block == 3.0 and progress.seconds_left == 6.0
    assert messages == [
        "Block 1/4 (model.layers.0) done in 2.0 s; 2.0 s per block, about 6.0 s left",
        "Block 2/4 (model.layers.1) done in 4.0 s; 3.0 s per block, about 6.0 s left",
    ]


def test_a_resumed_run_counts_the_blocks_done_before_but_times_only_its_own(messages):
    progress = BlockProgress(total=10, done=6)
    assert progress.seconds_left is None
    progress.block_done("model.layers.6", 30.0)
    assert progress.seconds_left == 90.0
    assert messages == [
        "Block 7/10 (model.layers.6) done in 30 s; 30 s per block, about 1 min 30 s left"
    ]


def test_disabled_progress_counts_without_logging(messages):
    progress = BlockProgress(total=2, enabled=False)
    progress.block_done("model.layers.0", 1.0)
    assert progress.done == 1 and messages == []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.34, "0.3 s"), (42.4, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")],
)
def test_durations_read_as_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_no_bar_is_made_so_no_lock_is_taken(monkeypatch):
    """A tqdm bar, even hidden, takes a lock (tqdm's own is shared with forked processes, and
    left locked for ever by one killed while holding it): off a terminal none is made."""
    taken = []
    lock = tqdm.get_lock
    monkeypatch.setattr(tqdm, "get_lock", classmethod(lambda cls: taken.append(cls) or lock()))
    items = [1, 2, 3]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(items, "Saving") is items
    assert progress_bar(items, "Saving", enabled=False) is items
    assert taken == []


def test_on_a_terminal_the_bar_takes_a_lock_of_this_process_only(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys, "stderr", Terminal())
    shown = progress_bar(items, "Saving")
    assert isinstance(shown, tqdm) and list(shown) == items
    assert "Saving" in sys.stderr.getvalue()
    assert type(shown).get_lock() is not tqdm.get_lock()
    assert isinstance(type(shown).get_lock(), type(threading.RLock()))
    assert progress_bar(items, "Saving", enabled=False) is items

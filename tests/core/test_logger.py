"""LoggerManager fan-out and cadence, loguru output, model sparsity."""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from lightning_compress.core import BaseLogger, LoggerManager, LoguruLogger, model_sparsity
from lightning_compress.core.verbosity import set_verbosity


class Sink(BaseLogger):
    def __init__(self, name="sink", enabled=True):
        super().__init__(name, enabled)
        self.records = []

    def log_scalar(self, tag, value, step=None):
        self.records.append((tag, value, step))


def test_manager_fans_out_to_enabled_loggers():
    on, off = Sink("on"), Sink("off", enabled=False)
    manager = LoggerManager([on, off], log_python=False)
    manager.log_scalar("a", torch.tensor(2.0), step=3)
    manager.metric.log_scalars("b", {"x": 1, "y": 2.5}, step=4)
    assert on.records == [("a", 2.0, 3), ("b/x", 1.0, 4), ("b/y", 2.5, 4)]
    assert off.records == []


def test_manager_adds_a_loguru_logger_by_default():
    assert any(isinstance(item, LoguruLogger) for item in LoggerManager().loggers)
    assert LoggerManager(log_python=False).loggers == []


def test_manager_rejects_non_loggers():
    with pytest.raises(TypeError, match="expected BaseLogger"):
        LoggerManager(["not a logger"])


@pytest.mark.parametrize(
    ("current", "last", "frequency", "cadence", "ready"),
    [
        (0.0, None, 0.1, None, True),
        (0.05, 0.0, 0.1, None, False),
        (0.3, 0.2, 0.1, None, True),
        (1.5, 1.0, 0.1, 1.0, False),
        (2.0, 1.0, 0.1, 1.0, True),
        (5.0, None, None, None, False),
    ],
)
def test_log_ready(current, last, frequency, cadence, ready):
    manager = LoggerManager(log_frequency=frequency, log_python=False)
    assert manager.log_ready(current, last, cadence) is ready


def test_loguru_logger_writes_messages():
    messages = []
    handler = logger.add(messages.append, level="DEBUG", format="{message}")
    set_verbosity("debug")
    try:
        LoguruLogger().log_scalar("acc", 0.5, step=2)
        LoguruLogger(level="INFO").log_string("note", "hello", step=1)
    finally:
        set_verbosity("info")
        logger.remove(handler)
    assert any("acc = 0.5 (step 2)" in m for m in messages)
    assert any("note: hello (step 1)" in m for m in messages)


def test_model_sparsity(model):
    with torch.no_grad():
        model.fc2.weight.zero_()
    sparsity = model_sparsity(model)
    assert sparsity["fc2"] == 1.0 and sparsity["fc1"] == 0.0
    assert sparsity["__all__"] == pytest.approx(64 / (128 + 64))

"""Fault injection for run reporting: a one-shot run that fails anywhere (data, a block's
calibration, Ctrl-C, the save) gives back Lightning's logger levels, the warning filters and
the Trainer's progress bar, and logs no summary of a compression that did not finish."""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from export_models import VOCAB, tiny_model, token_ids
from helpers import int8_channel_groups
from loguru import logger

from lightning_compress.core import LoguruLogger
from lightning_compress.core.verbosity import VERBOSITY_LEVELS, set_verbosity, verbosity
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.lightning.quiet import LIGHTNING_LOGGERS
from lightning_compress.modifiers import GPTQModifier
from lightning_compress.summary import CompressionSummary

KINDS = ("bad data", "block error", "interrupt", "save error")
EXPECTED = {
    "bad data": ValueError,
    "block error": RuntimeError,
    "interrupt": KeyboardInterrupt,
    "save error": OSError,
}


@dataclass(frozen=True)
class Fault:
    kind: str
    block: int
    own_trainer: bool
    pass_summary: bool

    def __str__(self) -> str:
        flags = f"trainer{int(self.own_trainer)}-summary{int(self.pass_summary)}"
        return f"{self.kind}-block{self.block}-{flags}"


def _faults(seed: int = 0) -> list[Fault]:
    """Every kind of fault with and without a Trainer passed in; the block it hits and whether
    a summary is passed in drawn with a fixed seed."""
    rng = random.Random(seed)
    return [
        Fault(kind, rng.randrange(2), own_trainer, rng.random() < 0.5)
        for kind in KINDS
        for own_trainer in (False, True)
    ]


def _raise_in_block(monkeypatch: pytest.MonkeyPatch, index: int, error: BaseException) -> None:
    """Makes GPTQ raise ``error`` when it compresses the layers of block ``index``."""
    compress = GPTQModifier._quantize_layers

    def failing(self, state, names):
        if any(f".layers.{index}." in name for name in names):
            raise error
        return compress(self, state, names)

    monkeypatch.setattr(GPTQModifier, "_quantize_layers", failing)


@pytest.mark.parametrize("fault", _faults(), ids=str)
def test_a_failed_run_restores_reporting_state_and_logs_no_summary(fault, tmp_path, monkeypatch):
    model = tiny_model("llama")
    data = token_ids()
    if fault.kind == "bad data":
        data[fault.block, 3] = VOCAB + 5
    elif fault.kind == "block error":
        _raise_in_block(monkeypatch, fault.block, RuntimeError("injected"))
    elif fault.kind == "interrupt":
        _raise_in_block(monkeypatch, fault.block, KeyboardInterrupt())
    else:

        def failing_write(*args, **kwargs):
            raise OSError("injected: disk full")

        monkeypatch.setattr("lightning_compress.export.save.write_shards", failing_write)
    trainer = (
        pl.Trainer(
            accelerator="cpu", inference_mode=False, logger=False, enable_model_summary=False
        )
        if fault.own_trainer
        else None
    )
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [item.level for item in loggers]
    filters = list(warnings.filters)
    summary = CompressionSummary() if fault.pass_summary else None
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        with pytest.raises(EXPECTED[fault.kind]):
            oneshot(
                model,
                GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
                data,
                8,
                output_dir=tmp_path / "out",
                trainer=trainer,
                summary=summary,
            )
    finally:
        logger.remove(sink)
    assert [item.level for item in loggers] == levels
    assert warnings.filters == filters
    assert verbosity() == "info"
    if trainer is not None:
        assert trainer.progress_bar_callback.is_enabled
    assert not any("compression summary" in line for line in lines)
    assert not (tmp_path / "out").exists()
    if summary is not None:
        assert summary.size_after is None and summary.output_dir is None
        compressed = fault.kind == "save error"  # the save failed after the compression
        assert bool(summary.quantized) == compressed
        assert (summary.linear_layers > 0) == compressed


@pytest.mark.parametrize("level", ["loud", "", "warning", None, 3, "debug "])
def test_an_unknown_verbosity_is_refused_naming_the_levels(level):
    with pytest.raises(ValueError, match=r"verbosity: expected one of \['info', 'debug'\]"):
        set_verbosity(level)
    assert verbosity() == "info"


@pytest.mark.parametrize("level", [*VERBOSITY_LEVELS, "DEBUG", "Info"])
def test_verbosity_levels_are_read_in_any_case(level):
    try:
        set_verbosity(level)
        assert verbosity() == level.lower()
    finally:
        set_verbosity("info")


@pytest.mark.parametrize("seed", range(3))
def test_layer_metrics_of_random_levels_show_only_at_or_above_info_by_default(seed):
    rng = random.Random(seed)
    levels = rng.sample(["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING"], 3)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["level"].name), level="TRACE")
    try:
        for level in levels:
            LoguruLogger(level=level).log_scalar("x", torch.tensor(1.0))
    finally:
        logger.remove(sink)
    assert lines == [level for level in levels if logger.level(level).no >= logger.level("INFO").no]

"""What a one-shot run reports: a summary that matches the checkpoint, one progress bar per
phase on a terminal, no Lightning chatter and no per-layer lines by default."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
from collections import defaultdict

import lightning.pytorch as pl
import pytest
import torch
from export_models import VOCAB, tiny_model, token_ids
from helpers import int8_channel_groups
from loguru import logger
from torch import nn

from lightning_compress.bundled import load_bundled_model
from lightning_compress.core.verbosity import set_verbosity
from lightning_compress.export.sparsity import SPARSITY_NAME
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.lightning.quiet import LIGHTNING_LOGGERS
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier, SparseGPTModifier
from lightning_compress.summary import CompressionSummary

LIGHTNING_CHATTER = ("GPU available", "TPU available", "litlogger", "LOCAL_RANK", "Validation")
LAYER_METRICS = ("QuantizationError/", "GPTQ/loss/", "GPTQ/seconds/")
BUNDLED_IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def verbosity():
    """Sets the verbosity for one test, and restores the default after it."""
    yield set_verbosity
    set_verbosity("info")


@pytest.fixture
def console():
    """What loguru's default sink (DEBUG) and Lightning's loggers would print, as a list."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for item in loggers:
        item.addHandler(handler)
    yield lines
    logger.remove(sink)
    for item in loggers:
        item.removeHandler(handler)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def mixed_recipe() -> list:
    """2:4 SparseGPT on the first block's MLP, int4 attention and int8 MLP, layers 1's
    down_proj ignored by the quantization, lm_head left out."""
    groups = {
        "attention": {
            "targets": [r"re:.*self_attn\..*_proj"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
        },
        "mlp": {
            "targets": [r"re:.*mlp\..*_proj"],
            "weights": {"num_bits": 8, "strategy": "channel"},
        },
    }
    return [
        SparseGPTModifier(
            sparsity=0.5, mask_structure="2:4", targets=[r"re:.*layers\.0\.mlp\..*_proj"]
        ),
        GPTQModifier(config_groups=groups, ignore=[r"re:.*layers\.1\.mlp\.down_proj"]),
    ]


def checkpoint_layers(
    config: dict, record: dict, model: nn.Module
) -> tuple[dict[str, set[str]], set[str]]:
    """The quantized layers of each config group, as ``config.json`` declares them (a layer
    takes the first group that names it, else the ``Linear`` one), and the sparse layers, as
    ``sparsity.json`` records them."""
    qconfig = config["quantization_config"]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    groups: dict[str, set[str]] = defaultdict(set)
    for name in linears:
        if name in qconfig["ignore"]:
            continue
        named = [key for key, group in qconfig["config_groups"].items() if name in group["targets"]]
        by_class = [
            key for key, group in qconfig["config_groups"].items() if "Linear" in group["targets"]
        ]
        groups[(named or by_class)[0]].add(name)
    return dict(groups), set(record["layers"])


def test_the_summary_equals_what_was_saved(tmp_path):
    model = tiny_model("llama")
    expected_before = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = CompressionSummary()
    begin = time.perf_counter()
    oneshot(
        model,
        mixed_recipe(),
        token_ids(),
        num_calibration_samples=8,
        output_dir=tmp_path / "out",
        summary=summary,
    )
    wall = time.perf_counter() - begin
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / SPARSITY_NAME).read_text())
    groups, sparse = checkpoint_layers(config, record, model)

    by_label: dict[str, set[str]] = defaultdict(set)
    for name, label in summary.quantized.items():
        by_label[label].add(name)
    assert sorted(map(sorted, by_label.values())) == sorted(map(sorted, groups.values()))
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert by_label["W4A16 (int4 g32)"] == {name for name in linears if "self_attn" in name}
    assert by_label["W8A16 (int8 per-channel)"] == {name for name in linears if ".mlp." in name} - {
        "model.layers.1.mlp.down_proj"
    }
    assert set(summary.sparse) == sparse
    assert sparse == {f"model.layers.0.mlp.{kind}_proj" for kind in ("gate", "up", "down")}
    assert set(summary.sparse.values()) == {"2:4 sparse"}
    assert record["sparsity_structure"] == "2:4"
    assert summary.schemes == {
        **{label: len(names) for label, names in by_label.items()},
        "2:4 sparse": 3,
    }

    compressed = set(summary.quantized) | set(summary.sparse)
    assert summary.linear_layers == len(linears)
    assert summary.ignored == ["model.layers.1.mlp.down_proj"]
    assert summary.left_out == ["lm_head"]
    assert compressed | set(summary.ignored) | set(summary.left_out) == linears

    assert summary.size_before == expected_before
    assert summary.dtype == "float32"
    assert summary.size_after == sum(path.stat().st_size for path in out.glob("*.safetensors"))
    assert summary.output_dir == out
    assert list(summary.phases) == ["data", "compress", "save"]
    assert all(seconds > 0 for seconds in summary.phases.values())
    assert sum(summary.phases.values()) <= wall


@pytest.mark.slow  # a fresh interpreter: its imports alone take seconds
def test_a_default_run_prints_the_summary_and_neither_layer_metrics_nor_lightning_chatter(
    tmp_path,
):
    script = f"""
from lightning_compress import oneshot
from lightning_compress.bundled import load_bundled_model
from lightning_compress.modifiers import GPTQModifier
import torch
ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
recipe = GPTQModifier(scheme="W4A16", ignore=["lm_head"])
oneshot(load_bundled_model(), recipe, ids, 2, output_dir={str(tmp_path / "out")!r})
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert "compression summary:" in err
    assert "compressed 28 of 29 linear layers (W4A16 (int4 g128): 28 layers)" in err
    assert "ignored: 1 (lm_head)" in err
    assert re.search(r"time: data [\d.]+ s, compress [\d.]+ s, save [\d.]+ s", err)
    for text in LIGHTNING_CHATTER + LAYER_METRICS + ("\r", "LeafSpec"):
        assert text not in run.stdout + err, text


def test_layer_metrics_and_lightning_messages_are_held_back_by_default(console):
    recipe = GPTQModifier(scheme="W4A16", ignore=["lm_head"])
    oneshot(load_bundled_model(), recipe, BUNDLED_IDS, 2)
    text = "\n".join(console)
    assert "compression summary:" in text
    assert "compressed 28 of 29 linear layers (W4A16 (int4 g128): 28 layers)" in text
    for line in LIGHTNING_CHATTER + LAYER_METRICS:
        assert line not in text, line


def test_the_debug_verbosity_shows_layer_metrics_and_lightning_messages(console, verbosity):
    verbosity("debug")
    oneshot(
        tiny_model("llama"),
        GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
        token_ids(),
        8,
    )
    text = "\n".join(console)
    assert "QuantizationError/model.layers.0.self_attn.q_proj" in text
    assert "GPU available" in text


def test_lightning_logger_levels_are_restored_after_a_run():
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    before = [item.level for item in loggers]
    oneshot(tiny_model("llama"), QuantizationModifier(scheme="W8A8"), token_ids(), 8)
    assert [item.level for item in loggers] == before


class BarState(pl.Callback):
    """Records whether the Trainer's progress bar is enabled when the calibration starts."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enabled.append(trainer.progress_bar_callback.is_enabled)


def test_a_trainer_passed_in_has_its_progress_bar_hidden_during_calibration_only():
    state = BarState()
    trainer = pl.Trainer(accelerator="cpu", inference_mode=False, logger=False, callbacks=[state])
    bar = trainer.progress_bar_callback
    assert bar is not None and bar.is_enabled
    recipe = GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])
    oneshot(tiny_model("llama"), recipe, token_ids(), 8, trainer=trainer)
    assert state.enabled == [False]
    assert bar.is_enabled


@pytest.mark.parametrize("progress", [True, False])
def test_calibration_and_saving_show_one_bar_each_on_a_terminal(tmp_path, monkeypatch, progress):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    oneshot(
        tiny_model("llama"),
        GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
        token_ids(),
        8,
        output_dir=tmp_path / "out",
        progress=progress,
    )
    text = terminal.getvalue()
    bars = {"Calibrating blocks": "2/2", "Saving tensors": ""}
    for label, count in bars.items():
        assert (label in text) is progress, label
        if progress:
            assert count in text
    if progress:
        assert "<" in text  # tqdm's elapsed<remaining ETA
    assert "Validation" not in text


def test_the_progress_bars_stay_off_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    oneshot(
        tiny_model("llama"),
        GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
        token_ids(),
        8,
        output_dir=tmp_path / "out",
    )
    assert stream.getvalue() == ""


def test_a_summary_passed_in_is_filled_and_left_to_the_caller_to_log(console):
    summary = CompressionSummary(phases={"load": 0.25})
    model = tiny_model("llama")
    returned = oneshot(
        model, QuantizationModifier(config_groups=int8_channel_groups()), None, summary=summary
    )
    assert returned is model
    assert not any("compression summary" in line for line in console)
    assert list(summary.phases) == ["load", "compress"]
    assert summary.phases["load"] == 0.25
    assert len(summary.quantized) == summary.linear_layers == 15
    summary.set_quality("perplexity", VOCAB, VOCAB)
    summary.log()
    assert "perplexity: 128 before -> 128 after (+0.0%)" in "\n".join(console)


class MetricsLogger(pl.loggers.Logger):
    """A Trainer logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass


def test_layer_metrics_reach_the_trainers_loggers_while_the_console_stays_quiet(console):
    metrics = MetricsLogger()
    trainer = pl.Trainer(accelerator="cpu", inference_mode=False, logger=metrics)
    recipe = GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])
    oneshot(tiny_model("llama"), recipe, token_ids(), 8, trainer=trainer)
    assert "compression/QuantizationError/model.layers.1.mlp.down_proj" in metrics.metrics
    assert not any("QuantizationError/" in line for line in console)

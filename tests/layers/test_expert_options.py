"""The command line and LightningCLI pass the all-experts calibration switch to oneshot."""

from __future__ import annotations

import inspect

import pytest

from lightning_compress.lightning import compress_command
from lightning_compress.lightning.cli import CompressionTrainer
from lightning_compress.lightning.compress_command import compress_parser


def test_the_compress_command_calibrates_every_expert_unless_told_otherwise():
    assert compress_parser().parse_args(["--recipe", "r.yaml"]).moe_calibrate_all_experts is True
    parsed = compress_parser().parse_args(
        ["--recipe", "r.yaml", "--moe_calibrate_all_experts", "false"]
    )
    assert parsed.moe_calibrate_all_experts is False


def test_the_compress_command_hands_the_switch_to_oneshot(monkeypatch):
    seen = {}

    class Reached(Exception):
        pass

    def fake_oneshot(model, recipe, *args, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(compress_command, "oneshot", fake_oneshot)
    recipe = "QuantizationModifier:\n  targets: [Linear]\n  scheme: W8A16\n"
    with pytest.raises(Reached):
        compress_command.run_compress(
            ["--recipe", recipe, "--moe_calibrate_all_experts", "false", "--eval_samples", "1"]
        )
    assert seen["moe_calibrate_all_experts"] is False


def test_lightning_cli_compress_takes_the_switch():
    parameter = inspect.signature(CompressionTrainer.compress).parameters
    assert parameter["moe_calibrate_all_experts"].default is True

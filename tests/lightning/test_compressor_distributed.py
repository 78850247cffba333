"""Compression under DDP (2 CPU processes, gloo) and FSDP2 (ModelParallelStrategy on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import int8_channel_groups
from lightning.pytorch import Callback, Trainer
from lightning_models import Regressor, regression_loader

from lightning_compress import Compressor
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.pruning import MagnitudePruningModifier

pytestmark = pytest.mark.distributed

FSDP2_SCRIPT = Path(__file__).with_name("fsdp2_run.py")


class RankAgreement(Callback):
    """After every batch, every compression buffer and weight is identical on all ranks."""

    def __init__(self, *buffers: str) -> None:
        self.buffers = buffers

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        named = dict(pl_module.named_buffers())
        named.update({k: v.detach() for k, v in pl_module.named_parameters()})
        for buffer in self.buffers:
            assert any(name.endswith(buffer) for name in named), buffer
        for name, tensor in named.items():
            gathered = trainer.strategy.all_gather(tensor.float())
            assert torch.equal(gathered[0], gathered[1]), f"{name} differs between ranks"


class SparsityRecorder(Callback):
    """Rank zero writes the fc1 sparsity after each step to a file the test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0:
            sparsity = float((pl_module.fc1.weight == 0).float().mean())
            with self.path.open("a") as handle:
                handle.write(f"{trainer.global_step} {sparsity}\n")


def test_ddp_ranks_agree_on_masks_and_qat_scales_and_pruning_follows_the_schedule(tmp_path):
    """One two-process run checks gradual pruning and QAT with static int8 inputs together."""
    record = tmp_path / "sparsity.txt"
    pruning = MagnitudePruningModifier(
        targets=["fc1", "fc2"],
        init_sparsity=0.0,
        final_sparsity=0.5,
        start=0,
        end=0.375,  # 64 samples, batch 4, 2 ranks: 8 steps per epoch; step 3
        inter_func="linear",
    )
    static_int8_inputs = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 16},
            "input_activations": {"num_bits": 8, "symmetric": False, "observer": "moving_average"},
        }
    }
    qat = QuantizationModifier(config_groups=static_int8_inputs, start=0)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=5,
        callbacks=[
            Compressor([pruning, qat]),
            RankAgreement("weight_mask", "input_scale"),
            SparsityRecorder(record),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), regression_loader(64))
    steps = {
        int(k): float(v) for k, v in (line.split() for line in record.read_text().splitlines())
    }
    # The target at the index each step reaches: masks follow the schedule right after a step.
    expected = {1: 1 / 6, 2: 2 / 6, 3: 0.5, 4: 0.5, 5: 0.5}
    assert steps.keys() == expected.keys()
    for step, target in expected.items():
        assert abs(steps[step] - target) <= 1 / 512, (step, steps[step], target)


@pytest.mark.slow
def test_ddp_training_goes_on_after_qat_ends_and_bakes_the_weights():
    # Baking used to swap the parameter's storage (set_), after which DDP's gradient hooks
    # never fired again: the next step failed with "parameters that were not used".
    modifier = QuantizationModifier(
        config_groups=int8_channel_groups(["Linear"]), start=0, end=0.125
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,  # 8 steps per epoch: QAT ends (bakes) after step 1
        callbacks=[Compressor(modifier), RankAgreement("weight_scale")],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), regression_loader(64))


def test_fsdp2_prunes_sharded_parameters_with_sharded_masks(tmp_path):
    result = subprocess.run(
        [sys.executable, str(FSDP2_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = torch.load(tmp_path / "report.pt", weights_only=True)
    for rank in (0, 1):
        assert report[rank]["mask_is_sharded"] and report[rank]["weight_is_sharded"]
        assert report[rank]["local_rows"] == 16
        assert abs(report[rank]["full_sparsity"] - 0.5) < 1e-6
    assert report[0]["full_weight"].equal(report[1]["full_weight"])

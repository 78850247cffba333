"""Compression under DDP (2 CPU processes, gloo) and FSDP2 (ModelParallelStrategy on CPU)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from forked_ranks import run_ranks
from helpers import int8_channel_groups
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_models import Regressor, regression_loader
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_compress import Compressor
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.pruning import MagnitudePruningModifier

pytestmark = pytest.mark.distributed


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
    # The ranks fork from this process; the Compressor goes through pickle first, as
    # ddp_spawn would send it to its ranks.
    compressor = pickle.loads(pickle.dumps(Compressor([pruning, qat])))
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=5,
        callbacks=[
            compressor,
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


class ShardedRegressor(Regressor):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.fc1, mesh=mesh)
        fully_shard(self.fc2, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class ShardingReport(Callback):
    """After the last step, rank 0 saves what each rank saw of fc1 to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != trainer.max_steps:
            return
        weight, mask = pl_module.fc1.weight, pl_module.fc1.weight_mask
        full = weight.full_tensor().detach()
        entry = {
            "weight_is_sharded": isinstance(weight, DTensor),
            "mask_is_sharded": isinstance(mask, DTensor),
            "local_rows": weight.to_local().shape[0],
            "full_sparsity": float((full == 0).float().mean()),
            "full_weight": full,
        }
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, entry)
        if trainer.global_rank == 0:
            torch.save(dict(enumerate(gathered)), self.path)


def prune_under_fsdp2(report: Path) -> None:
    """One rank of gradual pruning under FSDP2 (ModelParallelStrategy, 2 CPU processes)."""
    modifier = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.5, start=0, end=0.375, update=0.125
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=5,
        callbacks=[Compressor(modifier), ShardingReport(report)],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedRegressor(), regression_loader(64))


def test_fsdp2_prunes_sharded_parameters_with_sharded_masks(tmp_path):
    run_ranks(prune_under_fsdp2, tmp_path / "report.pt")
    report = torch.load(tmp_path / "report.pt", weights_only=True)
    for rank in (0, 1):
        assert report[rank]["mask_is_sharded"] and report[rank]["weight_is_sharded"]
        assert report[rank]["local_rows"] == 16
        assert abs(report[rank]["full_sparsity"] - 0.5) < 1e-6
    assert report[0]["full_weight"].equal(report[1]["full_weight"])

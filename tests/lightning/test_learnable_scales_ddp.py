"""Learnable weight scales under DDP (2 CPU processes, gloo)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning_models import Regressor, regression_loader

from lightning_compress import Compressor
from lightning_compress.modifiers import QuantizationModifier

pytestmark = pytest.mark.distributed

GROUPS_OF_16 = {
    "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 16}}
}


class ScalesAgreeAndMove(Callback):
    """After every batch the learned scales are identical on all ranks; they move while
    training."""

    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] = {}
        self.moved = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scales = {n: p.detach() for n, p in pl_module.named_parameters() if n.endswith(".scale")}
        assert len(scales) == 2
        for name, scale in scales.items():
            gathered = trainer.strategy.all_gather(scale)
            assert torch.equal(gathered[0], gathered[1]), f"{name} differs between ranks"
            first = self.first.setdefault(name, scale.clone())
            self.moved = self.moved or not torch.equal(first, scale)

    def on_train_end(self, trainer, pl_module):
        assert self.moved


@pytest.mark.slow  # two spawned processes: ~20 s
def test_ddp_trains_the_same_learned_scales_on_all_ranks():
    modifier = QuantizationModifier(config_groups=GROUPS_OF_16, start=0, learnable_scales=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        callbacks=[Compressor(modifier), ScalesAgreeAndMove()],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), regression_loader(64))


@pytest.mark.slow
def test_ddp_goes_on_after_qat_ends_when_told_of_unused_parameters():
    # once baked, a scale gets no gradient: DDP must be told (find_unused_parameters)
    modifier = QuantizationModifier(
        config_groups=GROUPS_OF_16, start=0, end=0.125, learnable_scales=True
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_steps=3,  # 8 steps per epoch: QAT ends (bakes) after step 1
        callbacks=[Compressor(modifier)],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), regression_loader(64))
    names = [name for name, _ in trainer.lightning_module.named_parameters()]
    assert not any(name.endswith(".scale") for name in names)

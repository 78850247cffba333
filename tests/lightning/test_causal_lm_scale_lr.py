"""CausalLMModule gives learned quantization scales their own optimizer group: ``scale_lr``
and no weight decay."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer
from oneshot_then_train_runs import CONFIG, token_loader

from lightning_compress.bundled import TinyDecoder
from lightning_compress.lightning import Compressor
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import QuantizationModifier

W4_G16 = {"num_bits": 4, "strategy": "group", "group_size": 16}


def fit(learnable: bool, **module_kwargs) -> tuple[CausalLMModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = CausalLMModule(TinyDecoder(CONFIG), lr=1e-3, weight_decay=0.1, **module_kwargs)
    qat = QuantizationModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": W4_G16}},
        ignore=["lm_head"],
        start=0,
        learnable_scales=learnable,
    )
    trainer = quiet_trainer(max_steps=2, callbacks=[Compressor([qat])])
    trainer.fit(module, token_loader(samples=8))
    return module, trainer.optimizers[0]


def test_learned_scales_get_scale_lr_and_no_weight_decay():
    module, optimizer = fit(learnable=True, scale_lr=1e-5)
    weights, scales = optimizer.param_groups
    # Training ended, so the scales were baked; the optimizer still holds the learned ones.
    assert len(scales["params"]) == 14
    assert scales["lr"] == 1e-5 and scales["weight_decay"] == 0.0
    assert weights["lr"] == 1e-3 and weights["weight_decay"] == 0.1
    learned = {id(p) for p in scales["params"]}
    assert not any(id(p) in learned for p in weights["params"])
    assert all(p.grad is not None for p in scales["params"])


def test_scale_lr_defaults_to_lr_and_fixed_scales_add_no_group():
    module = CausalLMModule(TinyDecoder(CONFIG), lr=1e-3)
    assert module.parameter_groups()[0]["params"] == list(module.parameters())
    _, optimizer = fit(learnable=False, scale_lr=1e-5)
    assert len(optimizer.param_groups) == 1
    _, optimizer = fit(learnable=True)
    assert optimizer.param_groups[1]["lr"] == 1e-3


def test_a_scale_lr_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="scale_lr: expected a positive float or None, got 0"):
        CausalLMModule(TinyDecoder(CONFIG), scale_lr=0)

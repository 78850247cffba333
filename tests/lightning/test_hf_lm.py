"""CausalLMModule on a Hugging Face causal LM: masked loss, loading, bf16-mixed with
accumulation, and activation checkpointing composed with quantization-aware training."""

from __future__ import annotations

import math

import pytest
import torch
from export_models import tiny_model, token_ids
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_compress.lightning import Compressor
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.lightning.text_data import TextDataModule
from lightning_compress.modifiers import QuantizationModifier

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def padded_batch() -> dict[str, torch.Tensor]:
    """Three samples of 12 tokens, two of them right-padded (with arbitrary token ids)."""
    ids = token_ids(3, 12)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy, each sample run alone and unpadded."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        real = ids[: int(mask.sum())]
        logits = model(real[None]).logits[0].double()
        for position in range(len(real) - 1):
            total -= torch.log_softmax(logits[position], -1)[real[position + 1]]
            count += 1
    return total / count


def test_masked_loss_equals_each_sample_scored_alone_without_padding():
    module = CausalLMModule(tiny_model())
    batch = padded_batch()
    with torch.no_grad():
        loss, _, _ = module._loss(batch)
        expected = reference_loss(module.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_padding_token_ids_do_not_change_the_loss():
    module = CausalLMModule(tiny_model())
    batch = padded_batch()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 5))
    with torch.no_grad():
        assert module._loss(batch)[0].item() == pytest.approx(module._loss(other)[0].item(), 1e-6)


def test_a_batch_of_only_padding_is_refused_naming_the_mask():
    module = CausalLMModule(tiny_model())
    batch = {"input_ids": token_ids(2, 8), "attention_mask": torch.zeros(2, 8, dtype=torch.long)}
    batch["attention_mask"][:, 0] = 1  # one real token each: nothing to predict
    with pytest.raises(ValueError, match="attention_mask"):
        module._loss(batch)


def test_a_model_directory_loads_with_from_pretrained(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    module = CausalLMModule(str(tmp_path))
    assert module.model.training
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_gradient_checkpointing_on_a_model_without_it_is_refused_naming_the_model():
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear"):
        CausalLMModule(nn.Linear(2, 2), gradient_checkpointing=True)


def test_warmup_raises_the_learning_rate_linearly_over_its_steps():
    module = CausalLMModule(tiny_model(), lr=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def token_data(batch_size: int = 2, pack: bool = True) -> TextDataModule:
    documents = token_ids(12, 20, seed=3)
    return TextDataModule(tokens=documents, seq_len=16, batch_size=batch_size, pack=pack)


def test_bf16_mixed_with_gradient_accumulation_trains_on_padded_batches():
    module = CausalLMModule(tiny_model().train(), lr=1e-2)
    before = module.model.lm_head.weight.detach().clone()
    trainer = Trainer(
        max_steps=2,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        limit_val_batches=1,
        **QUIET,
    )
    data = token_data(pack=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isfinite(metrics["val_perplexity"])
    assert module.model.lm_head.weight.dtype == torch.float32
    assert not torch.equal(module.model.lm_head.weight, before)


def qat_recipe() -> QuantizationModifier:
    """Weights in 4-bit groups and moving-average static inputs: hooks and parametrizations."""
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
        "input_activations": {"num_bits": 8, "symmetric": False, "observer": "moving_average"},
    }
    return QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"], start=0)


class LastTrainingState(Callback):
    """The model's state (with the QAT buffers) after the last training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.model.state_dict()
        self.state = {name: tensor.detach().clone() for name, tensor in state.items()}


def qat_run(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = CausalLMModule(
        tiny_model().train(), lr=1e-2, gradient_checkpointing=gradient_checkpointing
    )
    last = LastTrainingState()
    trainer = Trainer(max_steps=3, callbacks=[Compressor(qat_recipe()), last], **QUIET)
    trainer.fit(module, datamodule=token_data())
    return last.state


def test_activation_checkpointing_trains_qat_exactly_as_without_it():
    plain, checkpointed = qat_run(False), qat_run(True)
    assert plain.keys() == checkpointed.keys()
    assert any(name.endswith("input_min_vals") for name in plain)
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

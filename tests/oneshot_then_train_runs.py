"""A tiny causal LM, its token data and the recipe of the one-shot-then-train tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_compress import Compressor
from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

CONFIG = TinyDecoderConfig(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=64
)
W4_G16 = {"num_bits": 4, "strategy": "group", "group_size": 16}
LINEAR_BUT_HEAD = {"targets": ["Linear"], "weights": W4_G16}


class SGDCausalLM(CausalLMModule):
    """Next-token training with plain SGD (so that DDP and one process compare closely)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_module(lr: float = 1e-3) -> CausalLMModule:
    """A seeded tiny decoder under next-token training."""
    torch.manual_seed(0)
    return SGDCausalLM(TinyDecoder(CONFIG), lr=lr)


class CountingCompressor(Compressor):
    """A Compressor that records the optimizer step at which each one-shot stage runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_shot_steps: list[int] = []

    def _run_one_shot_stage(self, trainer: Trainer, pl_module: Any) -> None:
        self.one_shot_steps.append(trainer.global_step)
        super()._run_one_shot_stage(trainer, pl_module)


class SaveRankState(Callback):
    """Every rank saves its one-shot steps, its quantized layers at the first batch and its
    model's state when training ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.first: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = quantized_state(pl_module)

    def on_train_end(self, trainer, pl_module):
        (compressor,) = [cb for cb in trainer.callbacks if isinstance(cb, CountingCompressor)]
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        report = {"state": state, "first": self.first, "one_shot_steps": compressor.one_shot_steps}
        torch.save(report, self.directory / f"rank{trainer.global_rank}.pt")


def token_loader(batch_size: int = 4, samples: int = 32, order: Any = None) -> DataLoader:
    """Fixed random token windows, in order (or in the order of the indices ``order``)."""
    data = torch.randint(
        0, CONFIG.vocab_size, (samples, 17), generator=torch.Generator().manual_seed(1)
    )
    return DataLoader(data, batch_size=batch_size, sampler=order)


def gptq_then_qat(qat: dict[str, Any] | None = None, **gptq: Any) -> list:
    """GPTQ W4 g16 on every Linear but lm_head, then QAT of the same scheme from step 0."""
    groups = {"g": dict(LINEAR_BUT_HEAD)}
    return [
        GPTQModifier(config_groups=groups, ignore=["lm_head"], **gptq),
        QuantizationModifier(config_groups=qat or groups, ignore=["lm_head"], start=0),
    ]


class QuantizedState(Callback):
    """Records, at the first batch and at the end, the weights and scales of every layer."""

    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] | None = None
        self.steps_at_first: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.steps_at_first = trainer.global_step
            self.first = quantized_state(pl_module)


def quantized_state(pl_module: Any) -> dict[str, torch.Tensor]:
    """Every layer's weight (fake-quantized when it is) and weight_scale, by name."""
    state = {}
    with torch.no_grad():
        for name, module in pl_module.named_modules():
            if hasattr(module, "weight_scale"):
                state[f"{name}.weight"] = module.weight.detach().clone()
                state[f"{name}.weight_scale"] = module.weight_scale.detach().clone()
    return state

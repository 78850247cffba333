"""Tiny transformers models, compressed in memory, for the export and reliability tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.pruning import nm_mask

VOCAB = 128
GROUP_SIZE = 32
QUIET = {"enable_progress_bar": False, "logger": False}
ARCHITECTURE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": VOCAB,
}
MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**ARCHITECTURE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**ARCHITECTURE, tie_word_embeddings=True)),
}
W4A16_GROUP = {"num_bits": 4, "strategy": "group", "group_size": GROUP_SIZE}


def w4a16(targets: list[str] | None = None) -> QuantizationModifier:
    """4-bit symmetric weights in groups of 32 (the tiny models' layers are 64 or 128 wide)."""
    group = {"targets": targets or ["Linear"], "weights": W4A16_GROUP}
    return QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"])


def preset(name: str) -> QuantizationModifier:
    """A preset scheme on every linear layer but the LM head."""
    return QuantizationModifier(scheme=name, targets=["Linear"], ignore=["lm_head"])


SCHEMES: dict[str, Callable[[], QuantizationModifier]] = {
    "W4A16": w4a16,
    "W8A8": lambda: preset("W8A8"),
    "FP8": lambda: preset("FP8"),
    "2:4+W4A16": w4a16,
}


def tiny_model(kind: str = "llama", seed: int = 0) -> nn.Module:
    """A 2-layer transformers causal LM with random weights, in eval mode."""
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


def prune_2_4(model: nn.Module) -> None:
    """Zeroes the smaller 2 of every 4 input weights of each decoder linear layer."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4, name))


def token_ids(count: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[count, length]``."""
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def compressed(kind: str, scheme: str, seed: int = 0) -> nn.Module:
    """A tiny model compressed one-shot with ``scheme`` (``2:4+...``: pruned 2:4 first)."""
    model = tiny_model(kind, seed)
    if scheme.startswith("2:4"):
        prune_2_4(model)
    ids = token_ids()
    oneshot(model, SCHEMES[scheme](), ids, num_calibration_samples=8, trainer_kwargs=QUIET)
    return model

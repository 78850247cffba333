"""Tiny random mixture-of-experts language models of transformers 5, for the layer tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 64

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "num_experts_per_tok": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4},
    "qwen2_moe": {
        "num_experts": 4,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 16, "head_dim": 8},
    "olmoe": {"num_experts": 4},
    "gpt_oss": {"num_local_experts": 4, "head_dim": 8, "sliding_window": 8},
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 0,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
    "granitemoe": {"num_local_experts": 4},
}
"""Per model type, what (besides the common sizes) makes it a tiny mixture of four experts."""


def tiny_moe(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any
) -> nn.Module:
    """A tiny random ``model_type`` causal language model with four experts per block.

    Args:
        model_type: a key of :data:`MOE_CONFIGS`.
        seed: the random seed of the weights.
        dtype: the weights' dtype (rotary frequencies stay float32, as transformers keeps
            them; ``model.to(dtype)`` would round them).
        **sizes: config fields that replace the tiny defaults (``hidden_size=128``, ...).

    Returns:
        The model in eval mode, eager attention.
    """
    fields = {**_COMMON, **MOE_CONFIGS[model_type], **sizes}
    config = AutoConfig.for_model(model_type, **fields, attn_implementation="eager")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # some routers start at zero: give every expert a share of tokens
        for name, param in model.named_parameters():
            if param.dim() >= 2 and param.abs().sum() == 0:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]``."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def routed_experts(model: nn.Module, batches: list[torch.Tensor]) -> list[list[set[int]]]:
    """The experts each block routes some token of each batch to, by batch then block."""
    routed: list[list[set[int]]] = []

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        routed[-1].append(set(args[1].unique().tolist()))

    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    handles = [module.register_forward_hook(record) for module in experts]
    with torch.no_grad():
        for batch in batches:
            routed.append([])
            model(batch)
    for handle in handles:
        handle.remove()
    return routed

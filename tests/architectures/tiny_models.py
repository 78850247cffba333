"""Tiny random transformers causal LMs of many architectures, and their calibration tokens.

Every model has 2 decoder blocks, a hidden size of 64 and a vocabulary of 128; the mixtures of
experts have 4 experts of which 2 are routed per token. Every weight matrix of the decoder
blocks has a number of input columns that 16 and 32 divide, so group quantization fits each.

The weight matrices of the decoder blocks are read here without the project's code
(:func:`block_matrices`), so the tests can check what the project reports against them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

VOCAB = 128
HIDDEN = 64
LAYERS = 2
EXPERTS = 4
GROUP_SIZES = (16, 32)

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    **_TOKENS,
}
_MOE = {"num_experts_per_tok": 2}
_SMALL_EXPERTS = {"num_experts": EXPERTS, "moe_intermediate_size": 32, **_MOE}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 16},
    "mistral": _DECODER,
    "gemma2": {**_DECODER, "head_dim": 16},
    "gemma3_text": {**_DECODER, "head_dim": 16},
    "phi3": _DECODER,
    "olmo2": _DECODER,
    "granite": _DECODER,
    "starcoder2": _DECODER,
    "stablelm": _DECODER,
    "phi": _DECODER,
    "gpt_neox": _DECODER,
    "opt": {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "word_embed_proj_dim": HIDDEN,
        "ffn_dim": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        **_TOKENS,
    },
    "gpt2": {
        "vocab_size": VOCAB,
        "n_embd": HIDDEN,
        "n_inner": 128,
        "n_layer": LAYERS,
        "n_head": 4,
        "n_positions": 64,
        **_TOKENS,
    },
    "falcon": {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        **_TOKENS,
    },
    "mixtral": {**_DECODER, "num_local_experts": EXPERTS, **_MOE},
    "qwen2_moe": {**_DECODER, **_SMALL_EXPERTS, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**_DECODER, **_SMALL_EXPERTS, "head_dim": 16},
    "olmoe": {**_DECODER, "num_experts": EXPERTS, **_MOE},
    "granitemoe": {**_DECODER, "num_local_experts": EXPERTS, **_MOE},
    "gpt_oss": {
        **_DECODER,
        "num_local_experts": EXPERTS,
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 1.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        **_MOE,
    },
    "deepseek_v3": {
        **_DECODER,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_group": 1,
        "topk_group": 1,
        **_MOE,
    },
}
"""Config settings of each tiny model, by transformers ``model_type``."""

ROUTERS: dict[str, list[str]] = {
    "mixtral": [r"re:.*mlp\.gate$"],
    "qwen2_moe": [r"re:.*mlp\.gate$", r"re:.*mlp\.shared_expert_gate$"],
    "qwen3_moe": [r"re:.*mlp\.gate$"],
    "olmoe": [r"re:.*mlp\.gate$"],
    "granitemoe": [r"re:.*block_sparse_moe\.router$"],
    "gpt_oss": [r"re:.*mlp\.router$"],
    "deepseek_v3": [r"re:.*mlp\.gate$"],
}
"""The routers of each mixture of experts, as ignore patterns (vLLM keeps them unquantized)."""

_TRANSPOSED_EXPERTS = frozenset({"GptOssExperts"})
_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def tiny_config(kind: str) -> PretrainedConfig:
    """The config of the tiny model of one architecture.

    Args:
        kind: a key of :data:`ARCHITECTURES` (a transformers ``model_type``).

    Returns:
        The config.
    """
    return AutoConfig.for_model(kind, **ARCHITECTURES[kind])


def tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A tiny causal LM of one architecture with seeded random weights, in eval mode.

    Args:
        kind: a key of :data:`ARCHITECTURES`.
        seed: the seed of the weights.

    Returns:
        The model, in float32.
    """
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


def token_ids(count: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[count, length]``, a tokenizer-free calibration set.

    Args:
        count: the number of sequences.
        length: their length.
        seed: the seed.

    Returns:
        A LongTensor of ids below :data:`VOCAB`.
    """
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks of a transformers causal LM, by name.

    Args:
        model: the model.

    Returns:
        The modules of the one ``nn.ModuleList`` holding ``num_hidden_layers`` blocks.

    Raises:
        LookupError: when no such list, or several, exist.
    """
    count = model.config.num_hidden_layers
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and re.search(r"\.(layers|h)$", name)
    ]
    if len(lists) != 1:
        raise LookupError(f"{type(model).__name__}: expected one list of blocks, found {lists}")
    blocks = model.get_submodule(lists[0])
    return {f"{lists[0]}.{index}": block for index, block in enumerate(blocks)}


def block_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix of the decoder blocks as ``[out, in]``, one per expert.

    ``nn.Linear`` (and subclasses) as stored, transformers' ``Conv1D`` transposed, fused expert
    parameters ``[experts, out, in]`` (``[experts, in, out]`` for gpt-oss) split per expert and
    named ``<experts>.<parameter>.<expert>``. Vectors (norms, biases, attention sinks) are left
    out.

    Args:
        model: a transformers causal LM.

    Returns:
        The matrices (views of the weights), by name.

    Raises:
        TypeError: for a matrix of a module this function does not know.
    """
    matrices = {}
    for block_name, block in decoder_blocks(model).items():
        for name, parameter in block.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = block.get_submodule(owner_name)
            full = f"{block_name}.{name}"
            if parameter.dim() < 2 or leaf.endswith("bias"):
                continue
            if isinstance(owner, nn.Linear) and leaf == "weight":
                matrices[full] = parameter
            elif isinstance(owner, Conv1D) and leaf == "weight":
                matrices[full] = parameter.t()
            elif parameter.dim() == 3 and leaf in _EXPERT_PARAMETERS:
                transposed = type(owner).__name__ in _TRANSPOSED_EXPERTS
                for expert, matrix in enumerate(parameter):
                    matrices[f"{full}.{expert}"] = matrix.t() if transposed else matrix
            elif parameter.dim() == 2 and leaf == "weight" and "Router" in type(owner).__name__:
                matrices[full] = parameter
            else:
                raise TypeError(f"{full}: a {tuple(parameter.shape)} {type(owner).__name__} weight")
    return matrices


def is_router(name: str, kind: str) -> bool:
    """Whether a matrix of :func:`block_matrices` belongs to a router of ``kind``.

    Args:
        name: the matrix's name.
        kind: the architecture.

    Returns:
        True for the routers of :data:`ROUTERS`.
    """
    module = name.rpartition(".")[0]
    return any(re.match(pattern.removeprefix("re:"), module) for pattern in ROUTERS.get(kind, []))

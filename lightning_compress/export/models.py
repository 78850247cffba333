"""Which models can be exported, and the ``config.json`` each is described by.

Hugging Face ``PreTrainedModel`` s keep their own config. The bundled
:class:`~lightning_compress.bundled.TinyDecoder` has Llama's architecture and module names, so
it is exported as a ``LlamaForCausalLM`` checkpoint, which transformers and vLLM load as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig

__all__ = ["EXPORTABLE", "checkpoint_config", "find_exportable", "llama_config"]

EXPORTABLE = (PreTrainedModel, TinyDecoder)
"""The model classes ``save_compressed`` writes."""


def find_exportable(module: nn.Module) -> nn.Module:
    """The model to export inside ``module`` (e.g. a LightningModule holding it).

    Args:
        module: an exportable model, or a module holding exactly one (outermost) exportable
            model among its submodules.

    Returns:
        ``module`` itself, or the exportable model it holds.

    Raises:
        TypeError: when ``module`` holds no exportable model, or several.
    """
    if isinstance(module, EXPORTABLE):
        return module
    found = _outermost_exportable(module)
    if len(found) != 1:
        names = [name for name, _ in found]
        raise TypeError(
            f"{type(module).__name__} holds {len(found)} exportable models {names}; expected "
            "exactly one transformers PreTrainedModel or TinyDecoder to save (pass that model "
            "itself)"
        )
    return found[0][1]


def _outermost_exportable(module: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, EXPORTABLE):
            found.append((name, child))
        else:
            inside = _outermost_exportable(child)
            found.extend((f"{name}.{inner}", model) for inner, model in inside)
    return found


def checkpoint_config(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` content of ``model``'s checkpoint, without ``quantization_config``.

    Args:
        model: a transformers ``PreTrainedModel`` or a ``TinyDecoder``.

    Returns:
        The config, with ``architectures`` and the dtype of the model's weights.

    Raises:
        TypeError: for any other model.
    """
    if isinstance(model, PreTrainedModel):
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
    elif isinstance(model, TinyDecoder):
        config = llama_config(model.config).to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
    else:
        raise TypeError(
            f"save_compressed: expected a transformers PreTrainedModel or the bundled "
            f"TinyDecoder, got {type(model).__name__}"
        )
    config.pop("quantization_config", None)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = _dtype_name(model)
    return config


def llama_config(config: TinyDecoderConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of the model a ``TinyDecoder`` computes exactly.

    Args:
        config: the tiny decoder's configuration.

    Returns:
        The Llama configuration (untied embeddings, no biases, SiLU, default RoPE).
    """
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _dtype_name(model: nn.Module) -> str:
    dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )
    return str(dtype).removeprefix("torch.")

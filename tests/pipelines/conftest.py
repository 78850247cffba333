"""Tiny causal LMs with random weights: the bundled decoder and five transformers models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig

VOCAB = 128


def _tiny_decoder() -> nn.Module:
    config = TinyDecoderConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4
    )
    return TinyDecoder(config)


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    configs = {
        "llama": ("LlamaForCausalLM", "LlamaConfig", llama_like),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", llama_like),
        "mistral": ("MistralForCausalLM", "MistralConfig", llama_like),
        "opt": (
            "OPTForCausalLM",
            "OPTConfig",
            {
                "hidden_size": 64,
                "ffn_dim": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "word_embed_proj_dim": 64,
                "max_position_embeddings": 64,
            },
        ),
        "gpt2": (
            "GPT2LMHeadModel",
            "GPT2Config",
            {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
        ),
    }
    model_name, config_name, kwargs = configs[name]
    config = getattr(transformers, config_name)(**common, **kwargs)
    return getattr(transformers, model_name)(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tiny_decoder": _tiny_decoder,
    **{name: lambda name=name: _hf(name) for name in ("llama", "qwen2", "mistral", "opt", "gpt2")},
}
# Where each architecture keeps its decoder layers.
BLOCK_LISTS = {
    "tiny_decoder": "model.layers",
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


@pytest.fixture(params=list(BUILDERS))
def architecture(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_lm(architecture: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[architecture]().eval()


@pytest.fixture
def block_list(architecture: str) -> str:
    """The name of the architecture's list of decoder layers."""
    return BLOCK_LISTS[architecture]


@pytest.fixture
def token_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of two sequences; the second batch is left-padded in one row."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[3, :4] = 0
    return [
        {"input_ids": ids[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]

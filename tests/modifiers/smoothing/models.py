"""Tiny decoders of every supported architecture, and a calibration run without a Trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import CompressionSession
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines import BasicPipeline, PipelineOptions, SequentialPipeline

VOCAB = 96

QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LLAMA_GQA = [
    ("input_layernorm", QKV),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
]
LLAMA = [*LLAMA_GQA[:1], ("self_attn.v_proj", ["self_attn.o_proj"]), *LLAMA_GQA[1:]]
OPT = [
    ("self_attn_layer_norm", QKV),
    ("self_attn.v_proj", ["self_attn.out_proj"]),
    ("final_layer_norm", ["fc1"]),  # fc1 -> fc2 passes ReLU: not linear
]


def tiny_decoder(kv_heads: int = 2) -> nn.Module:
    config = TinyDecoderConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        max_seq_len=64,
    )
    return TinyDecoder(config)


def hf_model(name: str, **kwargs: Any) -> nn.Module:
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = getattr(transformers, f"{name}Config")(**common, **kwargs)
    return getattr(transformers, f"{name}ForCausalLM")(config)


def llama_like(name: str, kv_heads: int) -> Callable[[], nn.Module]:
    return lambda: hf_model(
        name,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )


def opt() -> nn.Module:
    return hf_model(
        "OPT",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
    )


# name: (builder, where the blocks are, the mappings expected in every block)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], str, list]] = {
    "tiny_decoder_gqa": (tiny_decoder, "model.layers", LLAMA_GQA),
    "tiny_decoder_mha": (lambda: tiny_decoder(kv_heads=4), "model.layers", LLAMA),
    "llama": (llama_like("Llama", 4), "model.layers", LLAMA),
    "qwen2_gqa": (llama_like("Qwen2", 2), "model.layers", LLAMA_GQA),
    "mistral": (llama_like("Mistral", 4), "model.layers", LLAMA),
    "opt": (opt, "model.decoder.layers", OPT),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name][0]().eval()


def expected_mappings(name: str) -> list[tuple[str, tuple[str, ...]]]:
    _, blocks, per_block = ARCHITECTURES[name]
    return [
        (f"{blocks}.{index}.{smooth}", tuple(f"{blocks}.{index}.{b}" for b in balances))
        for index in range(2)
        for smooth, balances in per_block
    ]


def token_batches(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, 16), generator=generator) for _ in range(count)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(ids)
    return getattr(output, "logits", output)


def calibrate(
    model: nn.Module,
    recipe: Any,
    batches: list[torch.Tensor] | None = None,
    pipeline: str = "sequential",
    **options: Any,
) -> list[Modifier]:
    """Runs the recipe on ``model`` through a pipeline; returns the session's modifiers."""
    session = CompressionSession()
    session.initialize(recipe=recipe, model=model)
    pipelines = {"sequential": SequentialPipeline, "basic": BasicPipeline}
    pipelines[pipeline](model, session, PipelineOptions(**options))(batches or token_batches())
    modifiers = list(session.lifecycle.recipe.modifiers)
    session.finalize()
    return modifiers


def inject_outliers(model: nn.Module, factor: float = 20.0) -> None:
    """Multiplies four channels of every normalization layer by ``factor`` and divides the
    matching weight columns of the layers reading it: same function, activation outliers."""
    channels = torch.tensor([3, 17, 40, 58])
    with torch.no_grad():
        for layer in model.model.layers:
            pairs = [
                (layer.input_layernorm, [getattr(layer.self_attn, f"{p}_proj") for p in "qkv"]),
                (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
            ]
            for norm, readers in pairs:
                norm.weight[channels] *= factor
                for reader in readers:
                    reader.weight[:, channels] /= factor

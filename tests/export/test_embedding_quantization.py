"""``nn.Embedding`` as a quantization target: its table is quantized like a ``Linear`` weight
(one-shot and trained), methods needing input activations refuse it, and the checkpoint reloads
in ``load_compressed`` and transformers with the logits of the model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from export_models import ARCHITECTURE, QUIET
from helpers import int8_channel_groups
from loguru import logger
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress.core import CompressionSession
from lightning_compress.core.events import EventType
from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier, SparseGPTModifier
from lightning_compress.recipe import RecipeError

PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120]])
WEIGHTS = {
    "int8 tensor": ({"num_bits": 8, "strategy": "tensor"}, None),
    "int8 channel": ({"num_bits": 8, "strategy": "channel"}, 1),
    "int4 group 32 asym": (
        {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False},
        32,
    ),
}


def embedding_recipe(weights: dict, start: float = -1) -> QuantizationModifier:
    """int8 per-channel Linear layers (``lm_head`` ignored) and an embedding group."""
    return QuantizationModifier(
        ignore=["lm_head"],
        start=start,
        config_groups={
            "linear": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}},
            "embedding": {"targets": ["Embedding"], "weights": weights},
        },
    )


def reference_table(
    table: torch.Tensor, weights: dict, group: int | None
) -> tuple[torch.Tensor, float]:
    """Round-to-nearest of each row (``group=1``), group of ``group`` columns, or the whole
    table (``None``), in float64: min-max range including 0, symmetric or with a zero point.
    Returns the dequantized table and the largest step (scale)."""
    bits, symmetric = weights["num_bits"], weights.get("symmetric", True)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = table.double().reshape(1, -1) if group is None else table.double()
    blocks = rows.reshape(rows.shape[0], -1, rows.shape[1] if group in (None, 1) else group)
    lo = blocks.amin(-1, keepdim=True).clamp(max=0)
    hi = blocks.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale, zero = torch.maximum(-lo, hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = (qmin - lo / scale).round().clamp(qmin, qmax)
    codes = (blocks / scale + zero).round().clamp(qmin, qmax)
    return ((codes - zero) * scale).reshape(table.shape), scale.amax().item()


def tiny_llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCHITECTURE, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_round_to_nearest_quantizes_the_table_like_a_linear_weight(name):
    weights, group = WEIGHTS[name]
    model = tiny_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    oneshot(model, embedding_recipe(weights), trainer_kwargs=QUIET)
    expected, step = reference_table(table, weights, group)
    got = model.model.embed_tokens.weight.detach().double()
    # float32 rounding may move a value on a rounding tie by one step; nothing else differs
    assert ((got - expected).abs() <= step * 1.001 + 1e-7).all()
    assert ((got - expected).abs() > 1e-6).float().mean() < 0.01
    assert model.model.embed_tokens.quantization_scheme.weights.num_bits == weights["num_bits"]
    assert model.model.embed_tokens.weight_scale.shape[0] == (1 if group is None else 128)


def test_trained_embedding_looks_up_the_fake_quantized_table():
    model = tiny_llama()
    session = CompressionSession()
    session.initialize(
        recipe=embedding_recipe({"num_bits": 4, "strategy": "channel"}, 0), model=model
    )
    session.event(EventType.BATCH_START, global_step=0)
    embedding = model.model.embed_tokens
    original = embedding.parametrizations.weight.original
    expected, _ = reference_table(original.detach(), {"num_bits": 4}, 1)
    ids = torch.tensor([[0, 5, 127]])
    torch.testing.assert_close(embedding(ids).double(), expected[ids[0]][None], atol=1e-6, rtol=0)
    embedding(ids).sum().backward()  # straight through to the float table
    assert original.grad is not None and original.grad[5].abs().sum() > 0


@pytest.mark.parametrize("modifier", [GPTQModifier, SparseGPTModifier])
def test_methods_needing_input_activations_refuse_an_embedding(modifier):
    model = tiny_llama()
    recipe = (  # GPTQ: "... no input Hessian"
        SparseGPTModifier(sparsity=0.5, targets=["Embedding"])
        if modifier is SparseGPTModifier
        else GPTQModifier(config_groups=int8_channel_groups("Embedding"))
    )
    with pytest.raises(RecipeError, match="'model.embed_tokens' is a Embedding"):
        CompressionSession().initialize(recipe=recipe, model=model)


@pytest.mark.parametrize(
    ("preset", "message"), [("W8A8", "input_activations"), ("NVFP4A16", "fp4 weights")]
)
def test_an_embedding_scheme_with_activations_or_fp4_weights_is_refused(preset, message):
    recipe = QuantizationModifier(scheme=preset, targets=["Embedding"])
    with pytest.raises(RecipeError, match=rf"'model.embed_tokens' is an Embedding.*{message}"):
        CompressionSession().initialize(recipe=recipe, model=tiny_llama())


FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel"}
SHARED = {"targets": ["Linear", "Embedding"], "weights": {"num_bits": 8, "strategy": "tensor"}}
RELOADED = {  # recipe, tied embeddings
    "int4 embedding, tied": (lambda: embedding_recipe(WEIGHTS["int4 group 32 asym"][0]), True),
    "fp8 embedding alone": (
        lambda: QuantizationModifier(
            config_groups={"e": {"targets": ["Embedding"], "weights": FP8_CHANNEL}}
        ),
        False,
    ),
    "one group for Linear and Embedding": (
        lambda: QuantizationModifier(config_groups={"g": SHARED}, ignore=["lm_head"]),
        False,
    ),
}


@pytest.mark.parametrize("case", list(RELOADED))
def test_quantized_embedding_reloads_with_equal_logits(case, tmp_path):
    recipe, tie = RELOADED[case]
    model = tiny_llama(tie)
    head = model.lm_head.weight.detach().clone()
    oneshot(model, recipe(), trainer_kwargs=QUIET)
    # a tied lm_head keeps the float table: the embedding got its own copy
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.model.embed_tokens.weight, head)
    messages = []
    handler = logger.add(messages.append, level="WARNING", format="{message}")
    logger.enable("lightning_compress")  # the export tests' fixture silences it
    try:
        path = save_compressed(model, tmp_path / "ckpt")
    finally:
        logger.disable("lightning_compress")
        logger.remove(handler)
    assert any("vLLM serves no quantized embedding" in m and "embed_tokens" in m for m in messages)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    groups = config["quantization_config"]["config_groups"]
    assert {"model.embed_tokens"} in [set(group["targets"]) for group in groups.values()]
    with torch.no_grad():
        expected = model(PROBE).logits
        for loaded in (load_compressed(path), AutoModelForCausalLM.from_pretrained(path)):
            torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=1e-5, atol=1e-5)

"""llm-compressor's own recipe files run through ``oneshot`` on a tiny Llama.

The YAML files under ``reference_recipes/`` are copied unchanged (but for a licence header) from
the llm-compressor repository, keeping their paths there. Each one runs on a 6-layer Llama with
128-wide layers (the recipes' group size of 128 divides them) and must compress some decoder
layer. Recipes refused today are ``xfail(strict=True)`` with the reason they are refused, so the
list records what a user migrating a recipe meets (each refusal must give the reason written here),
and the test fails when one starts running.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, token_ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import oneshot

ROOT = Path(__file__).parent / "reference_recipes"
RECIPES = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.yaml"))

STATIC_OBSERVER = (
    "observer='static_minmax' is invalid: expected one of ('minmax', 'moving_average', 'mse')"
)
DUO_SCALING = "AWQModifier.duo_scaling: expected bool, got 'both'"
ACTORDER = "QuantizationModifier.config_groups.group_0.weights: unknown key(s) ['actorder']"
SCHEME_MAPPING = "GPTQModifier.scheme: expected a preset name"
REFUSED = {
    "tests/e2e/recipes/INT8/recipe_int8_channel_weight_static_per_tensor_act.yaml": STATIC_OBSERVER,
    "tests/e2e/recipes/INT8/recipe_w8a8_static_asym.yaml": STATIC_OBSERVER,
    "tests/e2e/recipes/NVFP4/recipe_awq_nvfp4.yaml": DUO_SCALING,
    "tests/e2e/recipes/WNA16/recipe_w4a16_awq_asym.yaml": DUO_SCALING,
    "tests/e2e/recipes/WNA16/recipe_w4a16_awq_sym.yaml": DUO_SCALING,
    "tests/e2e/recipes/non_uniform/recipe_nvfp4_fp8_mixed.yaml": (
        "QuantizationModifier.config_groups.group_1.input_activations: num_bits=4 is invalid: "
        "expected one of [8] for type='float' with scale_dtype=None"
    ),
    "tests/llmcompressor/transformers/compression/recipes/new_quant_actorder_group.yaml": ACTORDER,
    "tests/llmcompressor/transformers/compression/recipes/new_quant_actorder_weight.yaml": ACTORDER,
    "tests/llmcompressor/transformers/compression/recipes/new_quant_channel.yaml": SCHEME_MAPPING,
    "tests/llmcompressor/transformers/compression/recipes/new_quant_group.yaml": SCHEME_MAPPING,
    "tests/llmcompressor/transformers/compression/recipes/new_quant_simple.yaml": (
        "QuantizationModifier.targets: layer 'model.embed_tokens' is a Embedding; "
        "expected Linear layers"
    ),
    "tests/llmcompressor/transformers/compression/recipes/new_quant_weight.yaml": SCHEME_MAPPING,
    "tests/sparsity/sparsegpt/recipes/quant.yaml": (
        "GPTQModifier: layer(s) ['lm_head'] received no calibration tokens"
    ),
}


def corpus() -> list:
    """Each recipe's path, those refused today marked ``xfail`` with the reason."""
    return [
        pytest.param(
            path,
            id=path,
            marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=REFUSED[path]),
        )
        if path in REFUSED
        else pytest.param(path, id=path)
        for path in RECIPES
    ]


def tiny_llama() -> nn.Module:
    """A 6-layer Llama (``test_tiny2`` names six decoder layers) with random weights whose
    linear layers are 128 or 256 wide."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**ARCHITECTURE, "num_hidden_layers": 6, "hidden_size": 128, "intermediate_size": 256}
    )
    return LlamaForCausalLM(config).eval()


def compressed_layers(model: nn.Module) -> list[str]:
    """Names of the decoder linear layers that carry a quantization scheme or hold at least a
    quarter zeros (``sparse.yaml`` prunes 30%; a random weight holds almost none), and of the
    attention modules whose keys and values are quantized (``kv_cache/default.yaml``)."""
    return [
        name
        for name, module in model.named_modules()
        if ".layers." in name
        and (
            isinstance(module, nn.Linear)
            and (
                getattr(module, "quantization_scheme", None) is not None
                or (module.weight == 0).float().mean().item() >= 0.25
            )
            or hasattr(module, "attention_scheme")
        )
    ]


def test_corpus_holds_all_34_reference_recipes_and_refusals_name_only_those() -> None:
    assert len(RECIPES) == 34
    assert set(REFUSED) <= set(RECIPES)


@pytest.mark.parametrize("path", corpus())
def test_reference_recipe_compresses_the_tiny_llama(path: str) -> None:
    model = tiny_llama()
    try:
        oneshot(
            model,
            str(ROOT / path),
            token_ids(),
            num_calibration_samples=8,
            trainer_kwargs=QUIET,
            progress=False,
        )
    except ValueError as error:
        if path in REFUSED:
            assert REFUSED[path] in str(error).splitlines()[0], "refused for another reason"
        raise
    assert compressed_layers(model), f"{path}: no decoder linear layer was quantized or pruned"

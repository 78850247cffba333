"""A GPTQModifier given no scheme quantizes with the schemes of the QuantizationModifier of its
recipe stage (llm-compressor's meaning): each of their linear layers once, with GPTQ."""

from __future__ import annotations

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, token_ids
from helpers import int8_channel_groups
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import oneshot
from lightning_compress.recipe import Recipe, RecipeError

GROUP = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"},
}
IGNORE = ["lm_head", "model.layers.0.mlp.down_proj"]
BORROWING = {
    "test_stage": {
        "quant_modifiers": {
            "QuantizationModifier": {"ignore": IGNORE, "config_groups": {"group_0": GROUP}},
            "GPTQModifier": {"block_size": 128},
        }
    }
}
OWN = {
    "test_stage": {
        "quant_modifiers": {
            "GPTQModifier": {
                "block_size": 128,
                "ignore": IGNORE,
                "config_groups": {"group_0": GROUP},
            }
        }
    }
}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCHITECTURE)).eval()


def compressed(recipe: dict) -> nn.Module:
    model = tiny_llama()
    oneshot(model, recipe, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    return model


def test_gptq_without_a_scheme_quantizes_as_gptq_with_the_quantization_modifiers_scheme():
    borrowed, own, plain = compressed(BORROWING), compressed(OWN), tiny_llama()
    for name, module in borrowed.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reference = own.get_submodule(name)
        # GPTQ once, from the full-precision weight: equal to GPTQ with the scheme of its own
        assert torch.equal(module.weight, reference.weight), name
        scheme = getattr(module, "quantization_scheme", None)
        if name in IGNORE:
            assert scheme is None and torch.equal(module.weight, plain.get_submodule(name).weight)
        else:
            assert (scheme.weights.num_bits, scheme.weights.strategy) == (4, "channel")
            assert torch.equal(module.weight_scale, reference.weight_scale), name


def test_the_recipe_written_back_still_lends_the_scheme():
    recipe = Recipe.create_instance(BORROWING)
    again = Recipe.create_instance(recipe.yaml())
    gptq = again.modifiers[1]
    assert "config_groups" not in recipe.dict()["test_stage"]["quant_modifiers"]["GPTQModifier"]
    assert gptq.resolved_schemes() == again.modifiers[0].resolved_schemes()


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        ({"GPTQModifier": {}}, r"GPTQModifier: no scheme, config_groups or kv_cache_scheme, and "),
        (
            {"SmoothQuantModifier": {}, "GPTQModifier": {"block_size": 64}},
            r"holds none QuantizationModifier with a scheme",
        ),
        (
            {
                "QuantizationModifier": {"config_groups": int8_channel_groups(), "start": 0},
                "GPTQModifier": {},
            },
            r"but that one trains \(start >= 0\)",
        ),
        (
            {
                "QuantizationModifier": {"config_groups": int8_channel_groups()},
                "GPTQModifier": {"actorder": "group"},
            },
            r"GPTQModifier.actorder: expected 'static', 'weight', 'none' or None for "
            r"config_groups.group_0 \(of QuantizationModifier\)",
        ),
    ],
    ids=["alone", "no-lender", "lender-trains", "lent-scheme-unfit"],
)
def test_gptq_without_a_scheme_and_nothing_to_take_it_from_is_refused(stage, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.create_instance({"test_stage": {"quant_modifiers": stage}})

"""A pruning target that names a module holding linear layers (``model.layers.0``) prunes the
linear layers inside it, as llm-compressor reads such a target; ``ignore`` reaches inside."""

from __future__ import annotations

import copy

import pytest
import torch
from modifiers.pruning.test_sparsegpt_modifier import PRUNERS, calibrated, tiny_decoder, token_ids
from torch import nn

from lightning_compress.recipe import RecipeError

BLOCK_0 = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
]


def pruned(model: nn.Module) -> list[str]:
    """Names of the linear layers holding at least 40% zeros."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (module.weight == 0).double().mean() >= 0.4
    ]


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("target", ["model.layers.0", "re:.*model.layers.0$", "re:.*layers.0.*"])
def test_a_decoder_layer_target_prunes_exactly_its_linear_layers(pruner, target):
    model = tiny_decoder(torch.float32)
    calibrated(model, pruner(sparsity=0.5, targets=[target]), token_ids())
    assert pruned(model) == BLOCK_0


@pytest.mark.parametrize("pruner", PRUNERS)
def test_ignore_reaches_the_layers_inside_a_targeted_module(pruner):
    model = tiny_decoder(torch.float32)
    recipe = pruner(sparsity=0.5, targets=["model.layers.0"], ignore=["re:.*mlp\\..*"])
    calibrated(model, recipe, token_ids())
    assert pruned(model) == BLOCK_0[:4]


def test_a_container_and_a_layer_inside_another_are_pruned_once_each():
    model = tiny_decoder(torch.float32)
    targets = ["model.layers.0", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.up_proj"]
    calibrated(model, PRUNERS[0](sparsity=0.5, targets=targets), token_ids())
    assert pruned(model) == [*BLOCK_0, "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("pruner", PRUNERS)
def test_a_targeted_module_without_linear_layers_is_refused_naming_it(pruner):
    model = tiny_decoder(torch.float32)
    before = copy.deepcopy(model.state_dict())
    recipe = pruner(sparsity=0.5, targets=["model.layers.0", "model.norm"])
    with pytest.raises(RecipeError, match=r"module 'model.norm' is a \w+ holding no Linear"):
        calibrated(model, recipe, token_ids())
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    ignored = pruner(sparsity=0.5, targets=["model.layers.0.mlp"], ignore=["re:.*proj"])
    with pytest.raises(RecipeError, match=r"module 'model.layers.0.mlp' is a \w+ holding no"):
        calibrated(model, ignored, token_ids())


def test_preserving_a_mask_sparser_than_asked_is_refused_naming_the_layer():
    model = tiny_decoder(torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :48] = 0
    recipe = PRUNERS[0](sparsity=0.5, targets=["model.layers.0"], preserve_sparsity_mask=True)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.up_proj' is already 0.75"):
        calibrated(model, recipe, token_ids())

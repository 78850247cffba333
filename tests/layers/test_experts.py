"""Fused experts as per-expert nn.Linear layers: same function, same weights, recipe names."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_models import MOE_CONFIGS, tiny_moe, tokens
from torch import nn

from lightning_compress.layers import LinearExperts, calibrating_all_experts, linearize
from lightning_compress.modifiers.base import Modifier


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name.endswith(".experts")}


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_linearized_model_gives_the_logits_of_the_fused_one(kind):
    model = tiny_moe(kind)
    ids = tokens()
    expected = logits(model, ids)
    assert len(linearize(model)) == 2
    assert all(isinstance(module, LinearExperts) for module in fused_experts(model).values())
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_each_expert_holds_its_slice_of_the_fused_weights(kind):
    model = tiny_moe(kind)
    fused = copy.deepcopy(fused_experts(model))  # linearize frees the fused weights
    linearize(model)
    for name, original in fused.items():
        expert = model.get_submodule(f"{name}.3")
        gate_up = original.gate_up_proj[3].detach()
        down = original.down_proj[3].detach()
        if original.is_transposed:
            gate_up, down = gate_up.t(), down.t()
        if original.is_concatenated:
            gate, up = gate_up.chunk(2, dim=0)
        else:
            gate, up = gate_up[0::2], gate_up[1::2]
        assert torch.equal(expert.gate_proj.weight, gate)
        assert torch.equal(expert.up_proj.weight, up)
        assert torch.equal(expert.down_proj.weight, down)
        if original.has_bias:
            bias = original.gate_up_proj_bias[3].detach()
            halves = bias.chunk(2) if original.is_concatenated else (bias[0::2], bias[1::2])
            assert torch.equal(expert.gate_proj.bias, halves[0])
            assert torch.equal(expert.up_proj.bias, halves[1])
            assert torch.equal(expert.down_proj.bias, original.down_proj_bias[3].detach())
        else:
            assert expert.gate_proj.bias is None and expert.down_proj.bias is None


class Targets(Modifier):
    """Resolves its targets and does nothing else (to see what recipes match)."""

    def on_initialize(self, state, **kwargs):
        return None


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v3", "granitemoe"])
def test_recipe_patterns_of_the_reference_project_match_the_experts(kind):
    model = tiny_moe(kind)
    linearize(model)
    down = Targets(targets=["re:.*experts.*down_proj"]).resolve_targets(model)
    assert sum(".experts." in name for name in down) == 2 * 4  # shared_experts too, if any
    assert all(isinstance(layer, nn.Linear) for layer in down.values())
    third = Targets(targets=["re:.*layers.0.*experts.3.gate_proj$"]).resolve_targets(model)
    assert list(third) == [f"{name}.3.gate_proj" for name in fused_experts(model) if ".0." in name]
    linear = Targets(targets=["Linear"], ignore=["lm_head"]).resolve_targets(model)
    assert {f"{name}.gate_proj" for name in fused_experts(model)} & set(linear) == set()
    assert sum(".experts." in name for name in linear) == 2 * 4 * 3


def rows_seen(model: nn.Module, layer: str, ids: torch.Tensor) -> int:
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_calibrating_all_experts_feeds_every_token_and_keeps_the_routed_output(kind):
    model = tiny_moe(kind)
    linearize(model)
    ids = tokens()
    layer = next(n for n in dict(model.named_modules()) if n.endswith("experts.1.up_proj"))
    routed_rows = rows_seen(model, layer, ids)
    routed = logits(model, ids)
    with calibrating_all_experts(model):
        assert rows_seen(model, layer, ids) == ids.numel()
        torch.testing.assert_close(logits(model, ids), routed, rtol=1e-5, atol=1e-6)
    assert routed_rows < ids.numel()
    assert rows_seen(model, layer, ids) == routed_rows


def test_calibrating_all_experts_disabled_keeps_routed_only_statistics():
    model = tiny_moe("mixtral")
    linearize(model)
    ids = tokens()
    layer = "model.layers.0.mlp.experts.2.down_proj"
    routed_rows = rows_seen(model, layer, ids)
    with calibrating_all_experts(model, enabled=False):
        assert rows_seen(model, layer, ids) == routed_rows


def test_an_expert_no_token_is_routed_to_is_skipped_in_inference_and_fed_in_calibration():
    model = tiny_moe("qwen3_moe")
    linearize(model)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(5, 32)
    index = torch.tensor([[0, 1]] * 5)
    weights = torch.full((5, 2), 0.5)
    seen = []
    experts.get_submodule("3.gate_proj").register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    out = experts(hidden, index, weights)
    assert seen == []
    with calibrating_all_experts(model):
        torch.testing.assert_close(experts(hidden, index, weights), out, rtol=1e-6, atol=1e-7)
    assert seen == [5]


def test_gradients_reach_each_expert_linear_layer():
    model = tiny_moe("olmoe").train()
    linearize(model)
    model(tokens(), labels=tokens()).loss.backward()
    grads = [
        module.weight.grad
        for name, module in model.named_modules()
        if ".experts." in name and isinstance(module, nn.Linear)
    ]
    assert len(grads) == 2 * 4 * 3
    assert sum(grad is not None and bool(grad.abs().sum() > 0) for grad in grads) >= 12

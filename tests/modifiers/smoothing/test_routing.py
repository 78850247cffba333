"""AWQ's Hessians of expert layers weight each token by its router weight, whichever way the
experts were calibrated."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures.tiny_models import ROUTERS, tiny_model, token_ids
from modifiers.smoothing.models import calibrate
from torch import nn

from lightning_compress.layers import linearize
from lightning_compress.layers.experts import LinearExperts, calibrating_all_experts
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.smoothing import AWQModifier, awq_search
from lightning_compress.modifiers.smoothing.routing import RoutedHessians

W4_G32 = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
EXPERT = "model.layers.0.mlp.experts.1"


def mixtral() -> nn.Module:
    model = tiny_model("mixtral")
    linearize(model)
    return model


def reference_hessians(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(2 / n) sum w^2 x x^T`` over the tokens routed to expert 1, token by token."""
    experts: LinearExperts = model.get_submodule(EXPERT.rsplit(".", 1)[0])
    expert = experts.get_submodule("1")
    calls = []
    handle = experts.register_forward_pre_hook(lambda module, args: calls.append(args))
    with torch.no_grad():
        model(ids)
    handle.remove()
    sums = {"gate_proj": torch.zeros(64, 64, dtype=torch.float64)}
    sums["down_proj"] = torch.zeros(128, 128, dtype=torch.float64)
    tokens = 0
    for hidden, index, weights in calls:
        tokens += hidden.shape[0]
        with torch.no_grad():
            inner = nn.functional.silu(expert.gate_proj(hidden)) * expert.up_proj(hidden)
        for t in range(hidden.shape[0]):
            for slot in range(index.shape[1]):
                if index[t, slot] == 1:
                    w = weights[t, slot].double()
                    for name, x in (("gate_proj", hidden[t]), ("down_proj", inner[t])):
                        sums[name] += 2 * w**2 * torch.outer(x.double(), x.double())
    return {f"{EXPERT}.{name}": total / tokens for name, total in sums.items()}


@pytest.mark.parametrize("all_experts", [True, False], ids=["all_experts", "routed_only"])
def test_expert_hessians_weight_each_routed_token_by_its_router_weight(all_experts):
    model = mixtral()
    ids = token_ids(2, 16)
    layers = dict(model.named_modules())
    watched = {name: layers[name] for name in (f"{EXPERT}.gate_proj", f"{EXPERT}.down_proj")}
    hessians = RoutedHessians(model, watched)
    assert sorted(hessians.names) == sorted(watched)
    handles = [m.register_forward_pre_hook(hessians.experts_hook) for m in hessians.mixtures]
    handles += [
        layers[name].register_forward_pre_hook(hessians.layer_hook(name)) for name in watched
    ]
    with calibrating_all_experts(model, all_experts), torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    got = hessians.reduced(watched)
    for name, expected in reference_hessians(model, ids).items():
        # float32 products: errors relative to the largest entry
        atol = 1e-6 * float(expected.abs().max())
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=atol)


def test_awq_measures_an_experts_error_on_its_routed_hessian():
    model = mixtral()
    original = copy.deepcopy(model)
    batches = list(token_ids(4, 16).split(2))
    ignore = ["lm_head", *ROUTERS["mixtral"]]
    (awq,) = calibrate(model, [AWQModifier(weights=W4_G32, ignore=ignore)], batches)
    result = awq.results[f"{EXPERT}.up_proj"]
    # down_proj's Hessian over the batches (block 0 sees the same inputs in the original)
    name = f"{EXPERT}.down_proj"
    hessian = sum(reference_hessians(original, ids)[name] for ids in batches) / len(batches)
    weight = original.get_submodule(name).weight
    args = QuantizationArgs.from_dict(W4_G32, where="weights")
    expected = awq_search([weight], [hessian], torch.ones(128), args, n_grid=1)
    assert result.unscaled_loss == pytest.approx(expected.unscaled_loss, rel=1e-4)

"""GPTQ of one expert equals GPTQ of a stand-alone nn.Linear fed the tokens the expert saw."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_models import tiny_moe, tokens
from torch import nn

from lightning_compress.core import CompressionSession
from lightning_compress.layers import linearize
from lightning_compress.modifiers import GPTQModifier
from lightning_compress.pipelines import PipelineOptions, create_pipeline

GROUP = {"num_bits": 4, "strategy": "group", "group_size": 16}


def gptq() -> GPTQModifier:
    return GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )


def run(model: nn.Module, pipeline: str, batches: list, **options) -> None:
    session = CompressionSession()
    session.initialize(recipe=gptq(), model=model)
    create_pipeline(pipeline, model, session, PipelineOptions(**options))(batches)
    session.finalize()


class Alone(nn.Module):
    """One linear layer and nothing else."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("everything", [True, False])
@pytest.mark.parametrize("layer", ["experts.2.down_proj", "experts.1.gate_proj"])
def test_gptq_of_an_expert_equals_gptq_of_the_same_linear_on_its_tokens(layer, everything):
    model = tiny_moe("qwen3_moe")
    linearize(model)
    target = model.get_submodule(f"model.layers.0.mlp.{layer}")
    alone = Alone(copy.deepcopy(target))
    original = target.weight.detach().clone()
    seen = []
    target.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    run(
        model,
        "sequential",
        [tokens(1, 12, seed) for seed in range(3)],
        **{"moe_calibrate_all_experts": everything},
    )
    assert len(seen) == 3
    assert (sum(x.shape[0] for x in seen) == 36) == everything
    run(alone, "basic", seen)

    assert torch.equal(target.weight, alone.proj.weight)
    assert torch.equal(target.weight_scale, alone.proj.weight_scale)
    assert not torch.equal(target.weight, original)

"""The staged calibration takes a mixture's experts as two stages: all gate/up, then all down."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from moe_models import routed_experts, tiny_moe, tokens
from torch import nn

from lightning_compress.core import CompressionSession
from lightning_compress.core.gram_bands import accumulator_bytes
from lightning_compress.layers import experts as experts_module
from lightning_compress.layers.known_inputs import inputs_known_ahead
from lightning_compress.modifiers import GPTQModifier, WandaPruningModifier
from lightning_compress.pipelines import PipelineOptions, create_pipeline
from lightning_compress.pipelines import staged as staged_module

from .test_sequential import all_hooks
from .test_staged import SubgraphLog, TwoBlocks, paused_batches

GROUP = {"num_bits": 4, "strategy": "group", "group_size": 16}
EXPERTS = 4
TWO_HESSIANS = 2 * accumulator_bytes(32)  # of the hidden size, float32 inputs


def gptq() -> GPTQModifier:
    return GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )


def calibrate(model, recipe, batches, everything: bool) -> CompressionSession:
    session = CompressionSession()
    session.initialize(recipe=recipe, model=model)
    options = PipelineOptions(moe_calibrate_all_experts=everything)
    create_pipeline("sequential", model, session, options)(batches)
    return session


def batches_skipping_an_expert() -> list[torch.Tensor]:
    """Batches whose first reaches every expert of each block and whose later ones do not."""
    return [tokens(2, 16, 0), tokens(1, 2, 13), tokens(1, 2, 6)]


def test_the_experts_of_a_block_are_compressed_in_two_stages(monkeypatch):
    found = []
    probe = staged_module.find_stages
    monkeypatch.setattr(
        staged_module, "find_stages", lambda *args: found.append(probe(*args)) or found[-1]
    )
    model = tiny_moe("qwen3_moe")
    batches = [tokens(2, 16, 0), tokens(2, 16, 1)]
    session = calibrate(model, [gptq(), SubgraphLog()], batches, everything=True)
    # what ranks compare to agree on the stages: names and plain flags, no probe tensors
    assert [[stage.declared for stage in stages] for stages in found] == [
        [False, False, True, True]
    ]
    log = session.lifecycle.recipe.modifiers[1]
    session.finalize()
    expected = []
    for block in ("model.layers.0", "model.layers.1"):
        experts = [f"{block}.mlp.experts.{e}" for e in range(EXPERTS)]
        expected += [
            [f"{block}.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")],
            [f"{block}.self_attn.o_proj"],
            [f"{expert}.{name}" for expert in experts for name in ("up_proj", "gate_proj")],
            [f"{expert}.down_proj" for expert in experts],
            [block],
        ]
    assert log.subgraphs == expected


def test_declared_stages_hold_at_most_the_statistics_budget(monkeypatch):
    """Routed, each expert's gate/up read their own input: with room for two float64 Hessians'
    accumulators of the hidden size (32), the experts' gate/up come in stages of two experts;
    the down projections (16 inputs each) all fit in one."""
    monkeypatch.setattr(staged_module, "DECLARED_STAGE_BYTES", TWO_HESSIANS)
    model = tiny_moe("qwen3_moe")
    session = calibrate(model, [gptq(), SubgraphLog()], batches_skipping_an_expert(), False)
    log = session.lifecycle.recipe.modifiers[1]
    session.finalize()
    experts = "model.layers.0.mlp.experts"
    pairs = [
        [f"{experts}.{e}.{name}" for e in pair for name in ("up_proj", "gate_proj")]
        for pair in ((0, 1), (2, 3))
    ]
    assert log.subgraphs[2:5] == [*pairs, [f"{experts}.{e}.down_proj" for e in range(EXPERTS)]]


def wanda() -> WandaPruningModifier:
    return WandaPruningModifier(
        sparsity=0.5, targets=["Linear"], ignore=["lm_head", "re:.*mlp.gate$"]
    )


@pytest.mark.parametrize("budget", [None, TWO_HESSIANS])
@pytest.mark.parametrize(("everything", "recipe"), [(True, wanda), (False, gptq)])
def test_two_stages_of_experts_equal_one_stage_per_expert(monkeypatch, everything, recipe, budget):
    """Each expert's layers read the same inputs and get the same statistics either way, so
    the weights are equal to the last bit, also when a later batch routes no token to the
    expert whose layers come first in a stage (its batch pauses at the next one), and when
    the declared stages are split to fit a statistics budget. Both runs make the same
    operations, so this holds on any CPU: with every token to every expert, GPTQ would solve
    all experts' gate/up in one stacked call in one run and two layers a call in the other
    (a BLAS may round a stack of another height differently), so that case runs Wanda, which
    compresses each layer on its own; routed, each expert has its own Hessian and the same
    GPTQ calls in both runs."""
    if budget is not None:
        monkeypatch.setattr(staged_module, "DECLARED_STAGE_BYTES", budget)
    batches = batches_skipping_an_expert()
    routed = routed_experts(tiny_moe("qwen3_moe"), batches)
    assert all(blocks == set(range(EXPERTS)) for blocks in routed[0])
    assert any(0 not in blocks for batch in routed[1:] for blocks in batch)

    two_stages = tiny_moe("qwen3_moe")
    calibrate(two_stages, recipe(), batches, everything).finalize()
    monkeypatch.setattr(experts_module, "inputs_known_ahead", lambda inputs: nullcontext())
    per_expert = tiny_moe("qwen3_moe")
    log = SubgraphLog()
    session = calibrate(per_expert, [recipe(), log], batches, everything)
    subgraphs = session.lifecycle.recipe.modifiers[1].subgraphs
    session.finalize()
    assert ["model.layers.0.mlp.experts.1.down_proj"] in subgraphs  # one stage per expert

    got, want = two_stages.state_dict(), per_expert.state_dict()
    assert got.keys() == want.keys()
    fused = tiny_moe("qwen3_moe").state_dict()["model.layers.0.mlp.experts.down_proj"]
    down = got["model.layers.0.mlp.experts.1.down_proj.weight"]  # compressed, not as it was
    assert down.shape == fused[1].shape and not torch.equal(down, fused[1])
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


class DeclaringBlock(nn.Module):
    """Declares ``a``'s and ``b``'s inputs; in long batches ``b`` reads a copy of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        doubled = 2 * x
        with inputs_known_ahead([(self.a, x), (self.b, doubled)]):
            first = self.a(x)
            second = self.b(doubled if x.shape[1] < 6 else doubled.clone())
        return x + first + second


class ForgetfulBlock(DeclaringBlock):
    """Declares ``a``'s and ``b``'s inputs in short batches only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < 6:
            return super().forward(x)
        return x + self.a(x) + self.b(2 * x)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (DeclaringBlock, r"'b' read another input than the one the block"),
        (ForgetfulBlock, r"'a' ran without the input its block declared"),
    ],
)
def test_a_layer_reading_another_input_than_declared_is_named(block, message):
    model = TwoBlocks(block)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batches = [torch.randint(0, 16, (1, 4)), torch.randint(0, 16, (1, 8))]
    recipe = WandaPruningModifier(sparsity=0.5, targets=["Linear"])
    with pytest.raises(RuntimeError, match=message):
        calibrate(model, [recipe, SubgraphLog()], batches, everything=True)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert all_hooks(model) == [] and not paused_batches()
    session = calibrate(model, [recipe, SubgraphLog()], batches[:1], everything=True)
    assert session.lifecycle.recipe.modifiers[1].subgraphs[0] == ["layers.0.a", "layers.0.b"]
    session.finalize()

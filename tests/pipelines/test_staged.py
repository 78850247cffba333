"""Staged calibration: one forward per block, each layer group compressed when all batches reach it.

The slow reference calibrates one group of layers at a time with the basic pipeline (the
whole model over all batches, then compress just that group), group after group and block
after block: every group sees the inputs that the already compressed layers before it produce.
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import pytest
import torch
from greenlet import greenlet
from torch import nn

from lightning_compress.core import CompressionSession, Event, EventType, State
from lightning_compress.modifiers import (
    GPTQModifier,
    Modifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.pipelines import BasicPipeline, PipelineOptions, call_model, find_blocks
from lightning_compress.pipelines import staged as staged_module

from .test_sequential import all_hooks, calibrate, record_outputs

W4_G16 = {
    "w4": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 16}}
}
W8A8_STATIC = {
    "w8a8": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
    }
}
RECIPES = {
    "gptq": lambda targets: GPTQModifier(config_groups=_only(W4_G16, targets)),
    "gptq_w8a8_static": lambda targets: GPTQModifier(config_groups=_only(W8A8_STATIC, targets)),
    "rtn_w8a8_static": lambda targets: QuantizationModifier(
        config_groups=_only(W8A8_STATIC, targets)
    ),
    "sparsegpt_2of4": lambda targets: SparseGPTModifier(
        sparsity=0.5, mask_structure="2:4", targets=targets
    ),
    "wanda": lambda targets: WandaPruningModifier(sparsity=0.5, targets=targets),
}
# The groups of layers reading one input, in the order a Llama-like block calls them.
STAGES = {
    "llama": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
    "opt": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.out_proj"],
        ["fc1"],
        ["fc2"],
    ],
}
STAGES["tiny_decoder"] = STAGES["qwen2"] = STAGES["mistral"] = STAGES["llama"]


def _only(groups: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    return {name: {**group, "targets": targets} for name, group in groups.items()}


def _linears(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` but the LM head."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    ]


def reference_true_sequential(
    model: nn.Module, recipe: str, batches: list, architecture: str
) -> None:
    """Compresses ``model`` one layer group at a time with the basic pipeline."""
    for block_name, _ in find_blocks(model):
        for stage in STAGES[architecture]:
            targets = [f"{block_name}.{name}" for name in stage]
            session = CompressionSession()
            session.initialize(recipe=RECIPES[recipe](targets), model=model)
            BasicPipeline(model, session, PipelineOptions())(batches)
            session.finalize()


def paused_batches() -> list[greenlet]:
    """Batches of a staged forward that started and have not finished."""
    gc.collect()
    return [g for g in gc.get_objects() if issubclass(type(g), greenlet) and g.parent and g]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("architecture", ["tiny_decoder", "llama", "qwen2", "mistral", "opt"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_staged_equals_compressing_one_group_at_a_time(
    tiny_lm, token_batches, architecture, recipe
):
    reference = copy.deepcopy(tiny_lm)
    reference_true_sequential(reference, recipe, token_batches, architecture)
    run = calibrate(tiny_lm, RECIPES[recipe](_linears(tiny_lm)), token_batches)
    assert run.forwards == [1, 1]
    got, want = weights(tiny_lm), weights(reference)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


class SubgraphLog(Modifier):
    """Records the layers of each SEQUENTIAL_EPOCH_END's subgraph (it compresses nothing)."""

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.names = {id(module): name for name, module in state.model.named_modules()}
        self.subgraphs: list[list[str]] = []

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module]:
        return []  # it handles the events of stages

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            subgraph = kwargs["subgraph"]
            if id(subgraph) in self.names:
                self.subgraphs.append([self.names[id(subgraph)]])
            else:
                self.subgraphs.append([self.names[id(module)] for module in subgraph])


@pytest.mark.parametrize("architecture", ["llama"])
def test_each_group_gets_its_event_then_the_block(tiny_lm, token_batches):
    run = calibrate(
        tiny_lm,
        [RECIPES["gptq"](_linears(tiny_lm)), SubgraphLog()],
        token_batches,
    )
    log = run.session.lifecycle.recipe.modifiers[1]
    expected = []
    for block, _ in find_blocks(tiny_lm):
        expected += [[f"{block}.{name}" for name in stage] for stage in STAGES["llama"]]
        expected.append([block])
    assert log.subgraphs == expected


@pytest.mark.parametrize("architecture", ["llama"])
@pytest.mark.parametrize("alike", [True, False])
def test_only_a_block_built_unlike_the_last_probed_is_probed(
    tiny_lm, token_batches, monkeypatch, alike
):
    probed: list[nn.Module] = []
    probe = staged_module.find_stages
    monkeypatch.setattr(
        staged_module,
        "find_stages",
        lambda block, *args: probed.append(block) or probe(block, *args),
    )
    blocks = [block for _, block in find_blocks(tiny_lm)]
    if not alike:
        blocks[1].extra = nn.Identity()  # one module more: built unlike block 0
    run = calibrate(tiny_lm, [RECIPES["gptq"](_linears(tiny_lm)), SubgraphLog()], token_batches)
    assert probed == (blocks[:1] if alike else blocks)
    log = run.session.lifecycle.recipe.modifiers[1]
    # the reused stages are block 1's own layers
    assert log.subgraphs[len(STAGES["llama"]) + 1] == [
        f"model.layers.1.{name}" for name in STAGES["llama"][0]
    ]


@pytest.mark.parametrize("architecture", ["llama"])
def test_every_hook_sees_each_batch_once_and_only_the_users_stay(tiny_lm, token_batches):
    seen: dict[str, list[torch.Tensor]] = {}
    for name in _linears(tiny_lm):
        tiny_lm.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, []).append(args[0])
        )
    users = all_hooks(tiny_lm)
    run = calibrate(tiny_lm, RECIPES["gptq"](_linears(tiny_lm)), token_batches)
    assert run.forwards == [1, 1]
    assert {name: len(xs) for name, xs in seen.items()} == dict.fromkeys(_linears(tiny_lm), 2)
    assert all_hooks(tiny_lm) == users
    assert not paused_batches()


@pytest.mark.parametrize("architecture", ["llama"])
def test_a_modifier_needing_the_whole_block_gets_two_forwards(tiny_lm, token_batches):
    fresh = copy.deepcopy(tiny_lm)
    recipe = [SmoothQuantModifier(), GPTQModifier(scheme="W8A8", targets=_linears(tiny_lm))]
    assert calibrate(tiny_lm, recipe, token_batches).forwards == [2, 2]
    unstaged = calibrate(fresh, RECIPES["gptq"](_linears(fresh)), token_batches, staged=False)
    assert unstaged.forwards == [2, 2]


class FailAt(Modifier):
    """Raises at the SEQUENTIAL_EPOCH_END whose subgraph holds the layer ``layer``."""

    layer: str = ""

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.target = state.model.get_submodule(self.layer)

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module]:
        return []

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        subgraph = kwargs.get("subgraph")
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END or not isinstance(subgraph, nn.ModuleList):
            return
        if any(module is self.target for module in subgraph):
            raise RuntimeError("injected failure")


class RaiseInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected failure")


@pytest.mark.parametrize("architecture", ["llama"])
@pytest.mark.parametrize("where", ["compression", "forward"])
def test_an_error_mid_block_restores_it_and_unwinds_every_batch(tiny_lm, token_batches, where):
    before = weights(tiny_lm)
    block = "model.layers.1"
    recipe = [RECIPES["gptq"](_linears(tiny_lm))]
    if where == "compression":
        recipe.append(FailAt(layer=f"{block}.mlp.gate_proj"))
    else:
        # the failure comes after the attention's groups were compressed
        tiny_lm.get_submodule(block).mlp.act_fn = RaiseInForward()
    with pytest.raises(RuntimeError, match="injected failure"):
        calibrate(tiny_lm, recipe, token_batches)
    assert all_hooks(tiny_lm) == []
    assert not paused_batches()
    after = weights(tiny_lm)
    for name, tensor in before.items():
        if name.startswith(f"{block}."):
            assert torch.equal(after[name], tensor), name  # the failing block is as it was
    assert not torch.equal(
        after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"]
    )


class FickleBlock(nn.Module):
    """``b`` reads ``a``'s input in short batches, a copy of it in long ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.a(x) + self.b(x if x.shape[1] < 6 else x.clone())


class TwoBlocks(nn.Module):
    """An embedding of 16 tokens in 8 features, then two blocks of class ``block``."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([block(), block()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_layer_reading_another_input_in_a_later_batch_is_named():
    model = TwoBlocks(FickleBlock)
    before = weights(model)
    batches = [torch.randint(0, 16, (1, 4)), torch.randint(0, 16, (1, 8))]
    with pytest.raises(RuntimeError, match=r"'b' read another input than 'a'.*staged=False"):
        calibrate(model, WandaPruningModifier(sparsity=0.5, targets=["Linear"]), batches)
    assert all(torch.equal(t, before[name]) for name, t in weights(model).items())
    assert all_hooks(model) == [] and not paused_batches()
    run = calibrate(
        model, WandaPruningModifier(sparsity=0.5, targets=["Linear"]), batches, staged=False
    )
    assert run.forwards == [2, 2]


class ZeroFirstBlockOutput(Modifier):
    """Zeroes block 0's ``down_proj`` at the block's own SEQUENTIAL_EPOCH_END (after staging)."""

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module]:
        return []

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        block = state.model.model.layers[0]
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END and kwargs["subgraph"] is block:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("architecture", ["llama"])
def test_a_change_at_the_block_event_reruns_the_block(tiny_lm, token_batches):
    plain = copy.deepcopy(tiny_lm)
    recipe = [RECIPES["gptq"](_linears(tiny_lm)), ZeroFirstBlockOutput()]
    run = calibrate(tiny_lm, recipe, token_batches)
    assert run.forwards == [2, 1]
    # block 1 was calibrated on block 0's final outputs: compare with running the result
    plain.load_state_dict(tiny_lm.state_dict(), strict=False)
    seen = record_outputs(plain.model.layers[0])
    with torch.no_grad():
        for batch in token_batches:
            call_model(plain, batch)
    for got, want in zip(run.next_inputs[0], seen, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

"""The contract every layer-wise modifier keeps (GPTQ, SparseGPT, Wanda, round-to-nearest).

Each runs through the same lifecycle on a block holding an "expert" layer that a router may
send no token: hooks are gone after the end and after an abort, every planned layer is
compressed, an abort leaves the model as it was, and a layer without tokens (or whose
Hessian stays singular) falls back to the data-free method, named in a warning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import int8_channel_groups
from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import (
    GPTQModifier,
    Modifier,
    QuantizationModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.modifiers.hessian import SingularHessianError
from lightning_compress.modifiers.pruning import sparsegpt_modifier
from lightning_compress.modifiers.quantization import gptq_modifier
from lightning_compress.recipe import RecipeError

WIDTH = 32
LAYERS = ("blocks.0.up", "blocks.0.down", "blocks.0.expert", "blocks.1.up", "blocks.1.down")


class Block(nn.Module):
    """Two dense layers and an "expert" that only tokens with ``x[..., 0] > threshold`` reach
    (it is not called at all when none do, as a router skips an expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Linear(WIDTH, WIDTH)
        self.expert = nn.Linear(WIDTH, WIDTH)
        self.threshold = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.up(x))
        routed = hidden[..., 0] > self.threshold
        out = self.down(hidden)
        if routed.any():
            out = out.clone()
            out[routed] = out[routed] + self.expert(hidden[routed])
        return x + out


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.blocks[1].threshold = float("inf")  # block 1's expert is never reached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "weight_scale") and hasattr(module, "quantization_scheme")


def _half_pruned(module: nn.Module) -> bool:
    return int((module.weight == 0).sum()) == module.weight.numel() // 2


@dataclass(frozen=True)
class Case:
    """A layer-wise modifier and how to tell that a layer was compressed."""

    name: str
    make: Callable[..., Modifier]
    compressed: Callable[[nn.Module], bool]

    def __str__(self) -> str:
        return self.name


TARGETS = {"targets": ["re:.*up$", "re:.*down$"]}


def _int8_weights(modifier: type[Modifier]) -> Callable[..., Modifier]:
    """Builds ``modifier`` quantizing ``targets`` to int8 per channel."""
    return lambda targets="Linear", **kw: modifier(config_groups=int8_channel_groups(targets), **kw)


CASES = [
    Case("gptq", _int8_weights(GPTQModifier), _is_quantized),
    Case("rtn", _int8_weights(QuantizationModifier), _is_quantized),
    Case("sparsegpt", lambda **kw: SparseGPTModifier(sparsity=0.5, **kw), _half_pruned),
    Case("wanda", lambda **kw: WandaPruningModifier(sparsity=0.5, **kw), _half_pruned),
]
CALIBRATED = [case for case in CASES if case.name != "rtn"]


def _inputs() -> torch.Tensor:
    return torch.randn(2, 16, WIDTH, generator=torch.Generator().manual_seed(1))


def _calibrate(model: Stack, modifier: Modifier, per_block: bool = True) -> Modifier:
    """Runs calibration block by block (SEQUENTIAL_EPOCH_END after each), or in one pass;
    returns the modifier the session built."""
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    x = _inputs()
    with torch.no_grad():
        for block in model.blocks:
            x = block(x)
            if per_block:
                session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=block)
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()
    (built,) = session.lifecycle.recipe.modifiers
    return built


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _warnings() -> tuple[list[str], int]:
    messages: list[str] = []
    return messages, logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("per_block", [True, False], ids=["per-block", "at-the-end"])
def test_every_planned_layer_is_compressed_and_no_hook_is_left(case, per_block):
    model = Stack()
    modifier = _calibrate(model, case.make(targets=["Linear"]), per_block)
    for name in LAYERS:
        assert case.compressed(model.get_submodule(name)), name
    assert _no_hooks(model) and modifier.num_hooks == 0


@pytest.mark.parametrize("case", CASES, ids=str)
def test_abort_after_calibrating_leaves_the_model_as_it_was(case):
    model = Stack()
    before = copy.deepcopy(model.state_dict())
    session = CompressionSession()
    session.initialize(recipe=case.make(targets=["Linear"]), model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        model(_inputs())
    session.lifecycle.abort()
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert _no_hooks(model)


def _data_free_reference(case: Case, weight: torch.Tensor) -> torch.Tensor:
    """What the data-free method gives: round-to-nearest for quantization (computed by the
    round-to-nearest modifier on a lone copy of the layer), magnitude for pruning (the
    smaller half of each row, by a sort)."""
    if case.compressed is _is_quantized:
        layer = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False))
        layer[0].weight.data.copy_(weight)
        session = CompressionSession()
        session.initialize(
            recipe=QuantizationModifier(config_groups=int8_channel_groups()), model=layer
        )
        session.finalize()
        return layer[0].weight.detach()
    smallest = weight.abs().argsort(dim=1)[:, : WIDTH // 2]
    return weight.scatter(1, smallest, 0.0)


@pytest.mark.parametrize("case", CALIBRATED, ids=str)
@pytest.mark.parametrize("per_block", [True, False], ids=["per-block", "at-the-end"])
def test_a_layer_the_router_sent_no_token_falls_back_with_a_warning(case, per_block):
    model = Stack()
    unrouted = "blocks.1.expert"
    weight = model.get_submodule(unrouted).weight.detach().clone()
    messages, sink = _warnings()
    try:
        modifier = _calibrate(model, case.make(targets=["Linear"]), per_block)
    finally:
        logger.remove(sink)
    assert list(modifier.layer_fallbacks) == [unrouted]
    assert any(unrouted in message and "instead" in message for message in messages), messages
    torch.testing.assert_close(
        model.get_submodule(unrouted).weight, _data_free_reference(case, weight), rtol=0, atol=0
    )
    assert case.compressed(model.get_submodule("blocks.0.expert"))  # routed: calibrated


@pytest.mark.parametrize("case", CALIBRATED, ids=str)
def test_a_block_that_no_token_reached_is_still_an_error(case):
    model = Stack()
    session = CompressionSession()
    session.initialize(recipe=case.make(targets=TARGETS["targets"]), model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        model.blocks[0](torch.zeros(1, 0, WIDTH))
    with pytest.raises(ValueError, match=r"\['blocks.0.up', 'blocks.0.down'\] received no"):
        session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    session.lifecycle.abort()


def _singular(*args: Any, **kwargs: Any) -> Any:
    raise SingularHessianError(
        "the Hessian is not positive definite even with dampening_frac in [0.01, 0.1, 1, 10]"
    )


@pytest.mark.parametrize(
    ("case", "module", "function"),
    [
        (CASES[0], gptq_modifier, "gptq_quantize"),
        (CASES[2], sparsegpt_modifier, "sparsegpt_prune"),
    ],
    ids=["gptq", "sparsegpt"],
)
def test_a_hessian_singular_after_the_retries_falls_back_with_a_warning(
    case, module, function, monkeypatch
):
    model = Stack()
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}
    monkeypatch.setattr(module, function, _singular)
    messages, sink = _warnings()
    try:
        modifier = _calibrate(model, case.make(**TARGETS))
    finally:
        logger.remove(sink)
    fallen = [name for name in LAYERS if "expert" not in name]
    assert sorted(modifier.layer_fallbacks) == sorted(fallen)
    assert any("dampening_frac in [0.01, 0.1, 1, 10]" in message for message in messages)
    for name in fallen:
        expected = _data_free_reference(case, weights[name])
        torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [GPTQModifier, QuantizationModifier], ids=["gptq", "rtn"])
def test_group_sizes_that_do_not_divide_layers_are_one_error_listing_them(make):
    model = nn.Sequential(nn.Linear(48, 8), nn.Linear(40, 8), nn.Linear(64, 8))
    groups = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
        }
    }
    session = CompressionSession()
    with pytest.raises(RecipeError) as raised:
        session.initialize(recipe=make(config_groups=groups), model=model)
    message = str(raised.value)
    assert "'0 (in_features=48)', '1 (in_features=40)'" in message and "2 (" not in message
    assert "ignore" in message

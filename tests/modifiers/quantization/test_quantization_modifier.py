"""QuantizationModifier (RTN weights) against a slow per-group reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import int8_channel_groups
from torch import nn

from lightning_compress.core import CompressionSession
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.recipe import RecipeError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(128, 64, bias=False)
        self.up_proj = nn.Linear(128, 256)
        self.odd = nn.Linear(96, 32)
        self.lm_head = nn.Linear(64, 10)


@pytest.fixture
def block() -> Block:
    torch.manual_seed(0)
    return Block()


def reference_rtn(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Quantize→dequantize each group of ``group`` input columns, one float32 scalar at a time.

    float32 scalars (not Python doubles) so the extreme value, which lands exactly on the
    half-step boundary by the symmetric formula, rounds the same way as float32 tensors do.
    """
    f32 = np.float32
    out = torch.empty_like(weight)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for row in range(weight.shape[0]):
        for g in range(weight.shape[1] // group):
            values = [f32(v) for v in weight[row, g * group : (g + 1) * group].tolist()]
            lo, hi = min(min(values), f32(0)), max(max(values), f32(0))
            if symmetric:
                scale = max(abs(lo), abs(hi)) / f32((qmax - qmin) / 2)
                zero = f32(0)
            else:
                scale = (hi - lo) / f32(qmax - qmin)
                zero = f32(min(max(np.round(f32(qmin) - lo / scale), qmin), qmax))
            for i, v in enumerate(values):
                q = min(max(np.round(v / scale + zero), qmin), qmax)
                out[row, g * group + i] = float((q - zero) * scale)
    return out


def run(model: nn.Module, modifier: QuantizationModifier) -> QuantizationModifier:
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.finalize()
    (built,) = session.lifecycle.recipe.modifiers
    return built


@pytest.mark.parametrize(("scheme", "symmetric"), [("W4A16", True), ("W4A16_ASYM", False)])
def test_presets_match_the_reference(block, scheme, symmetric):
    original = {name: m.weight.detach().clone() for name, m in block.named_children()}
    run(block, QuantizationModifier(scheme=scheme, targets=["q_proj", "up_proj"]))
    for name in ("q_proj", "up_proj"):
        expected = reference_rtn(original[name], bits=4, group=128, symmetric=symmetric)
        assert torch.allclose(getattr(block, name).weight, expected, atol=1e-6)
        assert getattr(block, name).weight_scale.shape == (original[name].shape[0], 1)
    assert torch.equal(block.lm_head.weight, original["lm_head"])
    assert not hasattr(block.lm_head, "weight_scale")


def test_per_channel_w8_and_buffers_in_state_dict(block):
    original = block.lm_head.weight.detach().clone()
    built = run(block, QuantizationModifier(config_groups=int8_channel_groups("lm_head")))
    expected = reference_rtn(original, bits=8, group=original.shape[1], symmetric=True)
    assert torch.allclose(block.lm_head.weight, expected, atol=1e-6)
    assert "lm_head.weight_scale" in block.state_dict()
    assert block.lm_head.quantization_scheme.weights.num_bits == 8
    assert 0 < built.layer_errors["lm_head"] < 0.01


def test_config_groups_with_args_and_ignore(block):
    original = block.odd.weight.detach().clone()
    modifier = QuantizationModifier(
        ignore=["lm_head", "q_proj", "up_proj"],
        config_groups={
            "g": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "strategy": "group",
                    "group_size": 32,
                    "symmetric": False,
                },
            }
        },
    )
    run(block, modifier)
    expected = reference_rtn(original, bits=4, group=32, symmetric=False)
    assert torch.allclose(block.odd.weight, expected, atol=1e-6)


def test_group_size_that_does_not_divide_names_layers_and_leaves_model(block):
    before = {k: v.clone() for k, v in block.state_dict().items()}
    session = CompressionSession()
    with pytest.raises(RecipeError, match=r"odd \(in_features=96\).*ignore"):
        session.initialize(recipe=QuantizationModifier(scheme="W4A16"), model=block)
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


TOKEN_WEIGHTS = {"num_bits": 8, "strategy": "token", "dynamic": True}
STATIC_GROUPS = {"num_bits": 8, "strategy": "group", "group_size": 32}
MSE_INPUTS = {"num_bits": 8, "observer": "mse"}
W8 = {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}
W8_MSE = {"targets": ["Linear"], "weights": {"num_bits": 8, "observer": "mse"}}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "QuantizationModifier.scheme: expected a preset name"),
        ({"scheme": "W3A3"}, r"QuantizationModifier.scheme: unknown preset .*W3A3.*FP8_DYNAMIC"),
        ({"scheme": "W4A16", "start": 2, "end": 1}, "end: expected an index at or after start=2"),
        ({"scheme": "W4A16", "start": None}, "start: expected -1 .* or an index >= 0"),
        ({"scheme": "FP8", "freeze_observers": 2}, "freeze_observers: expected None for one-shot"),
        (
            {"scheme": "FP8", "start": 2, "freeze_observers": 1},
            "freeze_observers: expected an index after start=2",
        ),
        (
            {"config_groups": {"g": {"targets": ["Linear"], "weights": TOKEN_WEIGHTS}}},
            r"config_groups.g: weights.strategy='token' is invalid: expected 'tensor', 'channel'",
        ),
        (
            {"config_groups": {"g": {**W8, "input_activations": STATIC_GROUPS}}},
            r"config_groups.g.input_activations.strategy: expected 'tensor' for static",
        ),
        (
            {"config_groups": {"g": {**W8, "output_activations": {"num_bits": 8}}}},
            r"config_groups.g.output_activations: expected None",
        ),
        (
            {"config_groups": {"g": {**W8_MSE}}, "start": 0},
            r"config_groups.g.weights.observer: expected 'minmax' for quantization-aware",
        ),
        (
            {"config_groups": {"g": {**W8, "input_activations": MSE_INPUTS}}, "start": 0},
            r"input_activations.observer: expected one of \['minmax', 'moving_average'\]",
        ),
        (
            {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 0}}}},
            r"config_groups.g.weights: num_bits=0",
        ),
        (
            {"config_groups": {"g": {"targets": ["Linear"], "weights": {"bits": 4}}}},
            r"unknown key.*bits.*valid keys",
        ),
        ({"config_groups": {"g": {"targets": ["Linear"]}}}, "has no 'weights'"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(RecipeError, match=message):
        QuantizationModifier(**settings)


def test_layer_in_two_schemes_and_non_linear_targets(block):
    twice = QuantizationModifier(scheme={"W8A16": ["q_proj"], "W4A16": ["re:q_.*"]})
    with pytest.raises(RecipeError, match="'q_proj' is targeted by two schemes"):
        CompressionSession().initialize(recipe=twice, model=block)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    norm = QuantizationModifier(config_groups=int8_channel_groups(["LayerNorm"]))
    with pytest.raises(RecipeError, match="'0' is a LayerNorm; expected Linear"):
        CompressionSession().initialize(recipe=norm, model=model)

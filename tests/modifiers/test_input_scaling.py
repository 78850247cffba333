"""The input-scaling protocol: weights take the scale, collectors correct their statistics."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.hessian_collector import HessianCollector
from lightning_compress.modifiers.input_scaling import (
    register_input_scale_hook,
    scale_inputs,
)


def rows(seed: int, n: int = 12, width: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=torch.float64)


def hessian_of(*xs: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(xs[0].shape[-1], torch.float64)
    for x in xs:
        accumulator.add(x)
    return accumulator.hessian()


def linears(*names: str) -> dict[str, nn.Linear]:
    torch.manual_seed(0)
    return {name: nn.Linear(6, 3).double() for name in names}


@pytest.fixture
def scale() -> torch.Tensor:
    return torch.linspace(0.25, 4.0, 6, dtype=torch.float64)


def test_linear_outputs_do_not_change_when_inputs_are_divided(scale):
    torch.manual_seed(0)
    x = rows(0)
    layer = nn.Linear(6, 3).double()
    expected = layer(x)
    scale_inputs([layer], scale)
    torch.testing.assert_close(layer(x / scale), expected, rtol=1e-12, atol=1e-12)
    for other in (nn.LayerNorm(6), Conv1D(3, 6)):  # Conv1D: an nn.Linear once linearized
        with pytest.raises(TypeError, match=f"{type(other).__name__} cannot take a scale"):
            scale_inputs([other], scale)
    with pytest.raises(ValueError, match="does not fit a Linear with 6 input channels"):
        scale_inputs([nn.Linear(6, 3)], scale[:4])


def test_each_distinct_hook_is_called_once_with_its_layers(scale):
    layers = linears("q", "k", "v")
    calls: list[tuple[str, list[nn.Module]]] = []
    shared = lambda scaled, s: calls.append(("shared", scaled))  # noqa: E731
    own = lambda scaled, s: calls.append(("own", scaled))  # noqa: E731
    for layer in layers.values():
        register_input_scale_hook(layer, shared)
    handle = register_input_scale_hook(layers["v"], own)
    scale_inputs(list(layers.values()), scale)
    assert calls == [("shared", list(layers.values())), ("own", [layers["v"]])]
    calls.clear()
    scale_inputs([layers["k"], layers["v"]], scale, notify=False)
    assert calls == []
    handle.remove()
    scale_inputs([layers["v"]], scale)
    assert calls == [("shared", [layers["v"]])]


def test_hooks_do_not_keep_their_layer_alive(scale):
    layer = nn.Linear(6, 3)
    register_input_scale_hook(layer, lambda scaled, s: None)
    alive = torch.utils.weak.WeakIdRef(layer)
    del layer
    gc.collect()
    assert alive() is None


def test_a_shared_hessian_is_rescaled_once(scale):
    layers = linears("q", "k", "v", "o")
    collector = HessianCollector()
    collector.follow_input_scaling(layers)
    x, y = rows(1), rows(2)
    for name, tensor in [("q", x), ("k", x), ("v", x), ("o", y)]:
        collector.observe(name, tensor)
    # the pending read (o's) is folded in before rescaling
    scale_inputs([layers[name] for name in "qkv"], scale)
    hessians = collector.reduced(layers)
    expected = hessian_of(x / scale)
    for name in "qkv":
        torch.testing.assert_close(hessians[name].hessian(), expected, rtol=1e-12, atol=0)
    assert hessians["q"] is hessians["k"] is hessians["v"]
    torch.testing.assert_close(hessians["o"].hessian(), hessian_of(y), rtol=1e-12, atol=0)


def test_rescaling_part_of_a_shared_hessian_splits_it(scale):
    layers = linears("q", "k", "v")
    collector = HessianCollector()
    collector.follow_input_scaling(layers)
    x, later = rows(3), rows(4)
    for name in "qkv":
        collector.observe(name, x)
    scale_inputs([layers["q"], layers["k"]], scale)
    for name in "qkv":  # later batches keep feeding both parts
        collector.observe(name, later)
    hessians = collector.reduced(layers)
    scaled, unscaled = hessian_of(x / scale, later), hessian_of(x, later)
    torch.testing.assert_close(hessians["q"].hessian(), scaled, rtol=1e-12, atol=0)
    torch.testing.assert_close(hessians["k"].hessian(), scaled, rtol=1e-12, atol=0)
    torch.testing.assert_close(hessians["v"].hessian(), unscaled, rtol=1e-12, atol=0)
    assert hessians["q"] is hessians["k"] and hessians["v"] is not hessians["q"]


def test_following_again_replaces_the_hooks_and_clear_removes_them(scale):
    layers = linears("q")
    collector = HessianCollector()
    collector.follow_input_scaling(layers)
    collector.follow_input_scaling(layers)  # a second call must not rescale twice
    x = rows(5)
    collector.observe("q", x)
    scale_inputs([layers["q"]], scale)
    torch.testing.assert_close(
        collector.reduced(layers)["q"].hessian(), hessian_of(x / scale), rtol=1e-12, atol=0
    )
    collector.clear()
    collector.observe("q", x)
    scale_inputs([layers["q"]], scale)
    torch.testing.assert_close(
        collector.reduced(layers)["q"].hessian(), hessian_of(x), rtol=1e-12, atol=0
    )

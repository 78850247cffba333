"""The quantized forward of layers that read one input: quantized once, the same values."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from lightning_compress.modifiers.quantization import runtime
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
)
from lightning_compress.modifiers.quantization.ops import compute_dynamic_qparams, fake_quantize
from lightning_compress.modifiers.quantization.runtime import attach_quantization

STATIC_FP8 = QuantizationArgs(type="float", strategy="tensor")


def _layer(args: QuantizationArgs, **buffers: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(32, 8, bias=False)
    for name, value in buffers.items():
        layer.register_buffer(name, value)
    attach_quantization(
        layer, QuantizationScheme(targets=["Linear"], weights=None, input_activations=args)
    )
    return layer


def _reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed from its own fake-quantized input, step by step."""
    args = layer.quantization_scheme.input_activations
    global_scale = getattr(layer, "input_global_scale", None)
    if args.dynamic:
        scale, zero_point = compute_dynamic_qparams(x, args, global_scale)
    else:
        scale, zero_point = layer.input_scale, layer.input_zero_point
    return fake_quantize(x, scale, zero_point, args, global_scale) @ layer.weight.T


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fake quantizations of layer inputs."""
    calls = []
    original = runtime.fake_quantize

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "fake_quantize", counting)
    return calls


def _nvfp4_buffers() -> dict[str, torch.Tensor]:
    return {"input_global_scale": torch.tensor([448 * 6 / 4.0])}


@pytest.mark.parametrize(
    ("args", "buffers"),
    [
        (PRESET_SCHEMES["W4AFP8"]["input_activations"], dict),
        (PRESET_SCHEMES["NVFP4"]["input_activations"], _nvfp4_buffers),
        (STATIC_FP8, lambda: {"input_scale": torch.tensor([0.01]),
                              "input_zero_point": torch.zeros(1, dtype=torch.float8_e4m3fn)}),
    ],
    ids=["fp8-token-dynamic", "nvfp4-local", "fp8-static"],
)  # fmt: skip
def test_layers_reading_one_input_alike_quantize_it_once_with_each_ones_values(
    counted: list[int], args: QuantizationArgs, buffers
) -> None:
    torch.manual_seed(0)
    layers = [_layer(args, **buffers()) for _ in range(3)]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        outputs = [layer(x) for layer in layers]
        expected = [_reference(layer, x) for layer in layers]
    assert len(counted) == 1  # the references call ops.fake_quantize directly
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)


def test_layers_with_other_qparams_quantize_the_input_each_with_its_own(counted) -> None:
    zero = torch.zeros(1, dtype=torch.float8_e4m3fn)
    first = _layer(STATIC_FP8, input_scale=torch.tensor([0.01]), input_zero_point=zero)
    second = _layer(STATIC_FP8, input_scale=torch.tensor([0.02]), input_zero_point=zero.clone())
    x = torch.randn(4, 32)
    with torch.no_grad():
        outputs = first(x), second(x)
    assert len(counted) == 2
    torch.testing.assert_close(outputs[1], _reference(second, x), rtol=0, atol=0)


def test_an_input_changed_in_place_between_the_layers_is_quantized_again() -> None:
    args = PRESET_SCHEMES["W4AFP8"]["input_activations"]
    first, second = _layer(args), _layer(args)
    x = torch.randn(4, 32)
    with torch.no_grad():
        first(x)
        x.mul_(3)
        output = second(x)
    torch.testing.assert_close(output, _reference(second, x), rtol=0, atol=0)


def test_a_quantized_input_changed_in_place_by_its_reader_is_not_handed_on() -> None:
    args = PRESET_SCHEMES["W4AFP8"]["input_activations"]
    first, second = _layer(args), _layer(args)

    def doubles_its_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        inputs[0].mul_(2)

    first.register_forward_pre_hook(doubles_its_input)
    x = torch.randn(4, 32)
    with torch.no_grad():
        first(x)
        output = second(x)
    torch.testing.assert_close(output, _reference(second, x), rtol=0, atol=0)


def test_inputs_that_need_a_gradient_are_quantized_per_layer_with_straight_through(
    counted,
) -> None:
    args = PRESET_SCHEMES["W4AFP8"]["input_activations"]
    first, second = _layer(args), _layer(args)
    x = torch.randn(4, 32, requires_grad=True)
    (first(x).sum() + second(x).sum()).backward()
    assert not counted  # the straight-through path, per layer
    expected = (first.weight.sum(0) + second.weight.sum(0)).expand(4, 32)
    torch.testing.assert_close(x.grad, expected)


def test_the_kept_quantized_input_is_freed_with_its_input() -> None:
    args = PRESET_SCHEMES["W4AFP8"]["input_activations"]
    layer = _layer(args)
    x = torch.randn(4, 32)
    kept = []
    layer.register_forward_pre_hook(lambda module, inputs: kept.append(weakref.ref(inputs[0])))
    with torch.no_grad():
        layer(x)
    assert kept[0]() is not None  # kept while its input lives
    del x
    gc.collect()
    assert kept[0]() is None


def test_inference_mode_inputs_are_quantized_per_layer() -> None:
    args = PRESET_SCHEMES["W4AFP8"]["input_activations"]
    first, second = _layer(args), _layer(args)
    with torch.inference_mode():
        x = torch.randn(4, 32)
        outputs = first(x), second(x)
        expected = _reference(first, x), _reference(second, x)
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, rtol=0, atol=0)

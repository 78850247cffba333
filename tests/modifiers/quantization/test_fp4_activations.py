"""fp4 and MX activations: NVFP4's calibrated global scale with group scales per input
(``dynamic: local``) and the dynamic E8M0 groups of MXFP4 / MXFP8, against elementwise
references; one-shot and quantization-aware training give the same numerics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import (
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.observers import MSEObserver, observer_for
from lightning_compress.modifiers.quantization.ops import compute_dynamic_qparams, quant_range
from lightning_compress.modifiers.quantization.runtime import (
    attach_quantization,
    fake_quantize_input,
)
from lightning_compress.recipe import RecipeError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MAX = 448.0
NVFP4_INPUTS = preset_scheme("NVFP4", ["Linear"]).input_activations
MXFP4_INPUTS = preset_scheme("MXFP4", ["Linear"]).input_activations
MXFP8_INPUTS = preset_scheme("MXFP8", ["Linear"]).input_activations


def fp4(value: float) -> float:
    """``value`` rounded to the nearest fp4 e2m1 value (clamped to ±6), ties to the even code."""
    magnitude = min(abs(value), 6.0)
    best = min(range(len(FP4_VALUES)), key=lambda code: (abs(FP4_VALUES[code] - magnitude), code))
    distances = [abs(v - magnitude) for v in FP4_VALUES]
    ties = [code for code, d in enumerate(distances) if d == distances[best]]
    code = next((c for c in ties if c % 2 == 0), best)
    return math.copysign(FP4_VALUES[code], value)


def fp8(value: float) -> float:
    """``value`` rounded to fp8 e4m3 (one number at a time)."""
    return float(torch.tensor(value, dtype=torch.float32).to(torch.float8_e4m3fn).float())


def slow_nvfp4(x: torch.Tensor, global_scale: float) -> torch.Tensor:
    """NVFP4 activations one value at a time: per row, each run of 16 values takes the scale
    ``fp8(global * max|x| / 6)`` (0 becomes 0.125), divided by the global scale; values are
    rounded to fp4 in units of it."""
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    flat = out.view(-1, x.shape[-1])
    for r, row in enumerate(rows):
        for start in range(0, len(row), 16):
            group = row[start : start + 16]
            stored = fp8(global_scale * max(abs(v) for v in group) / 6) or 0.125
            scale = stored / global_scale
            for i, value in enumerate(group):
                flat[r, start + i] = fp4(value / scale) * scale
    return out


def slow_mx(x: torch.Tensor, element_max: float, to_grid) -> torch.Tensor:
    """MX activations one value at a time: each run of 32 values takes the scale ``2 ** e``
    with ``e = round(log2(max|x|)) - floor(log2(element_max))``, where ``max|x| = m * 2 ** k``
    (``m`` in [1, 2)) rounds up when ``m >= 1.75``; 0 takes scale 1."""
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    flat = out.view(-1, x.shape[-1])
    for r, row in enumerate(rows):
        for start in range(0, len(row), 32):
            group = row[start : start + 32]
            largest = max(abs(v) for v in group)
            if largest == 0:
                scale = 1.0
            else:
                mantissa, exponent = math.frexp(largest)  # largest = mantissa * 2**exponent
                power = exponent - 1 + (1 if 2 * mantissa >= 1.75 else 0)
                scale = 2.0 ** (power - math.floor(math.log2(element_max)))
            for i, value in enumerate(group):
                flat[r, start + i] = to_grid(max(-element_max, min(element_max, value / scale)))
                flat[r, start + i] *= scale
    return out


def layer_with(args: QuantizationArgs, **buffers: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(64, 8)
    layer.quantization_scheme = QuantizationScheme(["Linear"], None, args)
    for name, value in buffers.items():
        layer.register_buffer(name, value)
    return layer


def activations(seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, 0, :16] = 0.0  # an all-zero group
    x[1, 2, 16:32] *= 40  # a group far larger than the rest
    return x


def test_nvfp4_activations_match_the_elementwise_reference() -> None:
    x = activations()
    global_scale = FP8_MAX * 6 / float(x.abs().amax()) / 3  # some groups clamp at fp8's maximum
    layer = layer_with(NVFP4_INPUTS, input_global_scale=torch.tensor([global_scale]))
    got = fake_quantize_input(layer, x)
    torch.testing.assert_close(got, slow_nvfp4(x, global_scale), rtol=1e-6, atol=0)
    assert not torch.equal(got, x)


@pytest.mark.parametrize(
    ("args", "element_max", "to_grid"),
    [(MXFP4_INPUTS, 6.0, fp4), (MXFP8_INPUTS, FP8_MAX, fp8)],
    ids=["mxfp4", "mxfp8"],
)
def test_mx_activations_match_the_elementwise_reference(args, element_max, to_grid) -> None:
    x = activations(1)
    got = fake_quantize_input(layer_with(args), x)
    torch.testing.assert_close(got, slow_mx(x, element_max, to_grid), rtol=1e-6, atol=0)


def test_nvfp4_activations_need_their_calibrated_global_scale() -> None:
    with pytest.raises(ValueError, match=r"no \['input_global_scale'\] buffers"):
        attach_quantization(nn.Linear(64, 8), preset_scheme("NVFP4", ["Linear"]))


def calibrate(model: nn.Module, modifier: QuantizationModifier, batches) -> None:
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        for x in batches:
            model(x)
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()


def test_one_shot_calibrates_the_input_global_scale_from_the_running_absmax() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    batches = [activations(seed) * (seed + 1) for seed in range(3)]
    calibrate(model, QuantizationModifier(scheme="NVFP4", targets=["Linear"]), batches)
    largest = max(float(x.abs().amax()) for x in batches)
    layer = model[0]
    assert layer.input_global_scale.dtype == torch.float32
    assert layer.input_global_scale.shape == (1,)
    assert float(layer.input_global_scale) == pytest.approx(FP8_MAX * 6 / largest, rel=1e-6)
    x = batches[0]
    expected = F.linear(slow_nvfp4(x, float(layer.input_global_scale)), layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_memoryless_minmax_calibrates_on_the_last_batch_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    batches = [activations(0) * 10, activations(1)]
    config = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "channel"},
            "input_activations": {**NVFP4_INPUTS.to_dict(), "observer": "memoryless_minmax"},
        }
    }
    calibrate(model, QuantizationModifier(config_groups=config), batches)
    last = float(batches[-1].abs().amax())
    assert float(model[0].input_global_scale) == pytest.approx(FP8_MAX * 6 / last, rel=1e-6)


def test_an_all_zero_calibration_input_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"layer '0' input is all zero"):
        calibrate(
            model,
            QuantizationModifier(scheme="NVFP4", targets=["Linear"]),
            [torch.zeros(2, 4, 64)],
        )


@pytest.mark.parametrize("preset", ["NVFP4", "MXFP4", "MXFP8"])
def test_quantization_aware_training_has_the_one_shot_numerics(preset: str) -> None:
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(64, 32))
    one_shot = copy.deepcopy(trained)
    x = activations(2)
    calibrate(one_shot, QuantizationModifier(scheme=preset, targets=["Linear"]), [x])

    session = CompressionSession()
    session.initialize(
        recipe=QuantizationModifier(scheme=preset, targets=["Linear"], start=0), model=trained
    )
    session.event(EventType.BATCH_START, global_step=0)
    x_grad = x.clone().requires_grad_(True)
    out = trained(x_grad)  # observes the batch, then quantizes it as one-shot did
    assert torch.equal(out, one_shot(x))
    if preset == "NVFP4":
        assert torch.equal(trained[0].input_global_scale, one_shot[0].input_global_scale)

    # straight-through: the input's gradient is the float one, where no value was clamped
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = (grad_out @ trained[0].weight.detach()) * unclamped(x, trained[0])
    torch.testing.assert_close(x_grad.grad, expected)


def unclamped(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """1 where ``x`` divided by its group's scale lies inside the element grid, else 0."""
    args = layer.quantization_scheme.input_activations
    tensor_scale = layer._buffers.get("input_global_scale")
    scale, _ = compute_dynamic_qparams(x, args, tensor_scale)
    if tensor_scale is not None:
        scale = scale / tensor_scale
    scaled = x.unflatten(-1, (-1, args.group_size)) / scale.unsqueeze(-1)
    return (scaled.abs() <= quant_range(args)[1]).float().flatten(-2)


def test_dynamic_local_is_for_tensor_group_activations_only() -> None:
    with pytest.raises(ValueError, match=r"^strategy='group' is invalid: expected 'tensor_group'"):
        QuantizationArgs(type="float", strategy="group", group_size=32, dynamic="local")
    with pytest.raises(ValueError, match=r"^weights.dynamic='local' is invalid"):
        QuantizationScheme(["Linear"], NVFP4_INPUTS, None)
    with pytest.raises(ValueError, match=r"^strategy='tensor_group' is invalid.*dynamic=True"):
        QuantizationArgs(
            num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic=True
        )


def test_nvfp4_without_scale_dtype_is_nvfp4() -> None:
    args = QuantizationArgs.from_dict(
        {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    )
    assert args.scale_dtype == "float8_e4m3fn"


def test_static_tensor_group_activations_are_refused_with_what_to_write() -> None:
    config = {
        "g": {
            "targets": ["Linear"],
            "weights": NVFP4_INPUTS.to_dict() | {"dynamic": False},
            "input_activations": NVFP4_INPUTS.to_dict() | {"dynamic": False},
        }
    }
    with pytest.raises(RecipeError, match=r"input_activations.strategy: .*dynamic='local'"):
        QuantizationModifier(config_groups=config)


def test_mse_observers_are_refused_for_a_global_scale() -> None:
    with pytest.raises(ValueError, match=r"^observer='mse' is invalid: expected a min-max"):
        QuantizationArgs(**{**NVFP4_INPUTS.to_dict(), "observer": "mse"})


def test_observer_kwargs_take_llm_compressors_mse_search() -> None:
    args = QuantizationArgs(
        num_bits=4,
        strategy="channel",
        observer="mse",
        observer_kwargs={"maxshrink": 0.5, "grid": 10, "patience": 2, "norm": 2},
    )
    observer = observer_for(args)
    assert isinstance(observer, MSEObserver)
    assert observer.shrinks == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert (observer.norm, observer.patience) == (2, 2)
    assert args.to_dict()["observer_kwargs"] == {
        "grid": 10,
        "maxshrink": 0.5,
        "norm": 2,
        "patience": 2,
    }
    assert QuantizationArgs.from_dict(args.to_dict()) == args

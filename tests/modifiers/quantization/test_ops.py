"""Quantization math and settings, checked against a slow scalar reference."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
import torch

from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import (
    calculate_qparams,
    compute_dynamic_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_aligned,
    fake_quantize_ste,
    quantize,
    strategy_groups,
)

F32_EPS = torch.finfo(torch.float32).eps


# --- slow reference: Python loops, Python floats rounded to float32 after every operation ---


def f32(value: float) -> float:
    """Rounds a Python float to the nearest float32, as torch's float32 ops do."""
    return struct.unpack("f", struct.pack("f", value))[0]


def ref_range(args: QuantizationArgs) -> tuple[float, float]:
    if args.type == "float":
        return -448.0, 448.0
    return -(2.0 ** (args.num_bits - 1)), 2.0 ** (args.num_bits - 1) - 1


def ref_qparams(values: list[float], args: QuantizationArgs) -> tuple[float, float]:
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    qmin, qmax = ref_range(args)
    if args.symmetric:
        scale = f32(max(-lo, hi) / ((qmax - qmin) / 2))
        return (scale if scale != 0 else F32_EPS), 0.0
    scale = f32(f32(hi - lo) / (qmax - qmin))
    scale = scale if scale != 0 else F32_EPS
    zero_point = float(round(f32(qmin - f32(lo / scale))))
    return scale, min(max(zero_point, qmin), qmax)


def ref_quantize(value: float, scale: float, zero_point: float, args: QuantizationArgs) -> float:
    qmin, qmax = ref_range(args)
    scaled = min(max(f32(f32(value / scale) + zero_point), qmin), qmax)
    if args.type == "float":
        return torch.tensor(scaled).to(torch.float8_e4m3fn).item()
    return float(round(scaled))


def ref_groups(x: torch.Tensor, args: QuantizationArgs) -> list[list[tuple[int, ...]]]:
    """Lists, per scale in row-major qparams order, the indices of the values it covers."""
    indices = list(itertools.product(*(range(n) for n in x.shape)))
    if args.strategy == "tensor":
        return [indices]
    if args.strategy == "channel":
        return [[i for i in indices if i[0] == row] for row in range(x.shape[0])]
    rows = sorted({i[:-1] for i in indices})
    if args.strategy == "token":
        return [[i for i in indices if i[:-1] == row] for row in rows]
    n_groups = x.shape[-1] // args.group_size
    return [
        [i for i in indices if i[:-1] == row and i[-1] // args.group_size == g]
        for row in rows
        for g in range(n_groups)
    ]


def ref_fake_quantize(x: torch.Tensor, args: QuantizationArgs):
    """Returns reference (scales, zero points, q, x_hat), qparams as flat lists."""
    q, x_hat = torch.zeros_like(x), torch.zeros_like(x)
    scales, zero_points = [], []
    for group in ref_groups(x, args):
        scale, zero_point = ref_qparams([x[i].item() for i in group], args)
        scales.append(scale)
        zero_points.append(zero_point)
        for i in group:
            q[i] = ref_quantize(x[i].item(), scale, zero_point, args)
            x_hat[i] = f32(f32(q[i].item() - zero_point) * scale)
    return scales, zero_points, q, x_hat


# --- cases ---

INT_CASES = [
    QuantizationArgs(num_bits=bits, symmetric=sym, **strategy)
    for bits in (4, 8)
    for sym in (True, False)
    for strategy in (
        {"strategy": "tensor"},
        {"strategy": "channel"},
        {"strategy": "group", "group_size": 8},
        {"strategy": "token", "dynamic": True},
    )
]
FP8_CASES = [
    QuantizationArgs(type="float", strategy="tensor"),
    QuantizationArgs(type="float", strategy="channel"),
    QuantizationArgs(type="float", strategy="group", group_size=8),
    QuantizationArgs(type="float", strategy="token", dynamic=True),
]


def case_id(args: QuantizationArgs) -> str:
    symmetry = "sym" if args.symmetric else "asym"
    return f"{args.type}{args.num_bits}-{symmetry}-{args.strategy}"


def sample(args: QuantizationArgs) -> torch.Tensor:
    torch.manual_seed(0)
    shape = (2, 3, 16) if args.strategy == "token" else (4, 16)
    return torch.randn(shape) * 3 + 0.5


def qparams(x: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.dynamic:
        return compute_dynamic_qparams(x, args)
    return qparams_for_weight(x, args)


def expected_shape(x: torch.Tensor, args: QuantizationArgs) -> tuple[int, ...]:
    return {
        "tensor": (1,),
        "channel": (x.shape[0], 1),
        "group": (*x.shape[:-1], x.shape[-1] // (args.group_size or 1)),
        "token": (*x.shape[:-1], 1),
    }[args.strategy]


@pytest.mark.parametrize("args", INT_CASES + FP8_CASES, ids=case_id)
def test_matches_scalar_reference(args: QuantizationArgs) -> None:
    x = sample(args)
    scales, zero_points, ref_q, ref_x_hat = ref_fake_quantize(x, args)
    scale, zero_point = qparams(x, args)

    assert scale.shape == zero_point.shape == expected_shape(x, args)
    torch.testing.assert_close(scale.flatten().tolist(), scales, rtol=1e-7, atol=0)
    assert zero_point.float().flatten().tolist() == zero_points
    q = quantize(x, scale, zero_point, args)
    assert torch.equal(q.float(), ref_q)
    torch.testing.assert_close(dequantize(q, scale, zero_point, args), ref_x_hat)
    torch.testing.assert_close(fake_quantize(x, scale, zero_point, args), ref_x_hat)


@pytest.mark.parametrize("args", [a for a in INT_CASES + FP8_CASES if a.symmetric], ids=case_id)
def test_aligned_without_zero_points_equals_zero_zero_points(args: QuantizationArgs) -> None:
    # GPTQ's column loop passes None for symmetric qparams: two operations fewer, same values
    x = sample(args)
    scale, zero_point = qparams(x, args)
    assert not zero_point.float().any()
    groups = strategy_groups(x, args)
    aligned_scale = scale.unsqueeze(-1).to(x.dtype)
    expected = fake_quantize(x, scale, zero_point, args)
    aligned = fake_quantize_aligned(groups, aligned_scale, None, args)
    assert torch.equal(aligned.reshape(x.shape), expected)


@pytest.mark.parametrize("args", [a for a in INT_CASES + FP8_CASES if a.symmetric], ids=case_id)
def test_quantize_and_dequantize_without_zero_points_equal_zero_zero_points(
    args: QuantizationArgs,
) -> None:
    x = sample(args)
    scale, zero_point = qparams(x, args)
    q = quantize(x, scale, zero_point, args)
    assert torch.equal(quantize(x, scale, None, args), q)
    assert torch.equal(dequantize(q, scale, None, args), dequantize(q, scale, zero_point, args))


@pytest.mark.parametrize("args", INT_CASES, ids=case_id)
def test_int_values_in_range_and_error_at_most_half_a_step(args: QuantizationArgs) -> None:
    x = sample(args)
    scale, zero_point = qparams(x, args)
    q = quantize(x, scale, zero_point, args)
    qmin, qmax = ref_range(args)

    assert q.dtype == zero_point.dtype == torch.int8
    assert qmin <= q.min().item() and q.max().item() <= qmax
    error = strategy_groups((fake_quantize(x, scale, zero_point, args) - x).abs(), args)
    assert (error <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("args", FP8_CASES, ids=case_id)
def test_fp8_equals_torch_cast_of_scaled_values(args: QuantizationArgs) -> None:
    x = sample(args)
    scale, zero_point = qparams(x, args)
    scaled = strategy_groups(x, args) / scale.unsqueeze(-1)
    expected = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float().reshape(x.shape)

    q = quantize(x, scale, zero_point, args)
    assert q.dtype == zero_point.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float(), expected)
    assert scaled.abs().max().item() == pytest.approx(448, rel=1e-6)


def test_symmetric_scale_convention() -> None:
    args = QuantizationArgs(num_bits=8)
    scale, zero_point = calculate_qparams(torch.tensor(-2.0), torch.tensor(1.0), args)
    assert scale.item() == pytest.approx(2.0 / 127.5)
    assert scale.shape == zero_point.shape == (1,)
    fp8_scale, _ = calculate_qparams(torch.tensor(-2.0), torch.tensor(1.0), FP8_CASES[0])
    assert fp8_scale.item() == pytest.approx(2.0 / 448)


@pytest.mark.parametrize(
    "args",
    [
        PRESET_SCHEMES["NVFP4"]["input_activations"],
        QuantizationArgs(num_bits=8, strategy="group", group_size=5, dynamic=True),
        QuantizationArgs(num_bits=4, strategy="group", group_size=16, dynamic=True),
        QuantizationArgs(type="float", strategy="token", dynamic=True),
    ],
    ids=["nvfp4", "int8-odd-groups", "int4-groups-of-16", "fp8-tokens"],
)
def test_symmetric_dynamic_groups_get_the_qparams_of_their_minimum_and_maximum(
    args: QuantizationArgs,
) -> None:
    x = torch.randn(3, 7, 80, generator=torch.Generator().manual_seed(0))
    x[0, 0, : args.group_size or 80] = 0  # an all-zero group, and one of negative zeros
    x[0, 1, : args.group_size or 80] = -0.0
    x[1, 2, 3] = torch.nan
    x[2, 4, 1] = torch.inf
    x[2, 5, 2] = -torch.inf
    global_scale = torch.tensor([3.5]) if args.strategy == "tensor_group" else None
    scale, zero_point = compute_dynamic_qparams(x, args, global_scale)
    groups = strategy_groups(x, args)
    min_vals, max_vals = groups.amin(dim=-1), groups.amax(dim=-1)
    expected_scale, expected_zero_point = calculate_qparams(min_vals, max_vals, args, global_scale)
    assert scale.shape == expected_scale.shape == (3, 7, 80 // (args.group_size or 80))
    assert torch.equal(scale.nan_to_num(-1.0), expected_scale.nan_to_num(-1.0))
    assert torch.isnan(scale).sum() == 1
    assert torch.equal(zero_point.float(), expected_zero_point.float())


def test_range_is_widened_to_include_zero() -> None:
    args = QuantizationArgs(num_bits=8, symmetric=False)
    scale, zero_point = calculate_qparams(torch.tensor([2.0]), torch.tensor([5.0]), args)
    assert scale.item() == pytest.approx(5.0 / 255)
    assert zero_point.item() == -128


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_input_gets_eps_scale(symmetric: bool) -> None:
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="channel")
    x = torch.zeros(3, 8)
    scale, zero_point = qparams_for_weight(x, args)
    assert torch.equal(scale, torch.full((3, 1), F32_EPS))
    assert torch.equal(fake_quantize(x, scale, zero_point, args), x)


def test_keeps_input_dtype() -> None:
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=8)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    scale, zero_point = qparams_for_weight(x, args)
    assert scale.dtype == torch.bfloat16
    assert fake_quantize(x, scale, zero_point, args).dtype == torch.bfloat16
    assert fake_quantize_ste(x, scale, zero_point, args).dtype == torch.bfloat16


@pytest.mark.parametrize("args", [INT_CASES[1], INT_CASES[6], FP8_CASES[0]], ids=case_id)
def test_ste_gradient_is_one_inside_clamp_range_only(args: QuantizationArgs) -> None:
    x = sample(args)
    scale, zero_point = qparams(x / 2, args)  # static range too narrow: some values clamp
    scale.requires_grad_(True)
    x.requires_grad_(True)
    qmin, qmax = ref_range(args)
    scaled = strategy_groups(x.detach(), args) / scale.detach().unsqueeze(-1)
    scaled = scaled + zero_point.float().unsqueeze(-1)
    inside = ((scaled >= qmin) & (scaled <= qmax)).reshape(x.shape).float()

    out = fake_quantize_ste(x, scale, zero_point, args)
    out.sum().backward()

    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(out, fake_quantize(x.detach(), scale.detach(), zero_point, args))
    assert torch.equal(x.grad, inside)
    assert scale.grad is None


def test_group_size_must_divide_last_dimension() -> None:
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=128)
    with pytest.raises(ValueError, match=r"group_size=128.*\(8, 200\).*ignore"):
        qparams_for_weight(torch.randn(8, 200), args)
    with pytest.raises(ValueError, match="group_size=128"):
        fake_quantize(torch.randn(8, 200), torch.ones(8, 1), torch.zeros(8, 1), args)


def test_qparams_of_wrong_shape_are_rejected() -> None:
    args = QuantizationArgs(strategy="channel")
    with pytest.raises(ValueError, match=r"scale of shape \(3, 1\).*expected \(4, 1\)"):
        fake_quantize(torch.randn(4, 8), torch.ones(3, 1), torch.zeros(4, 1), args)
    with pytest.raises(ValueError, match="zero_point of shape"):
        quantize(torch.randn(4, 8), torch.ones(4, 1), torch.zeros(4, 2), args)


def test_token_strategy_is_not_for_weights() -> None:
    args = QuantizationArgs(strategy="token", dynamic=True)
    with pytest.raises(ValueError, match="token"):
        qparams_for_weight(torch.randn(4, 8), args)


# --- QuantizationArgs and QuantizationScheme ---

DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuantizationArgs)}
BAD_ARGS = [
    ({"num_bits": 0}, "num_bits"),
    ({"num_bits": 9}, "num_bits"),
    ({"num_bits": True}, "num_bits"),
    ({"num_bits": 4.0}, "num_bits"),
    ({"type": "fp4"}, "type"),
    ({"type": "float", "num_bits": 4}, "num_bits"),
    ({"type": "float", "symmetric": False}, "symmetric"),
    ({"symmetric": "yes"}, "symmetric"),
    ({"strategy": "block"}, "strategy"),
    ({"strategy": "group"}, "group_size"),
    ({"strategy": "group", "group_size": 0}, "group_size"),
    ({"strategy": "channel", "group_size": 128}, "group_size"),
    ({"group_size": 128}, "group_size"),
    ({"strategy": "token"}, "dynamic"),
    ({"strategy": "channel", "dynamic": True}, "strategy"),
    ({"dynamic": 1}, "dynamic"),
    ({"observer": "histogram"}, "observer"),
    ({"averaging_constant": 0}, "averaging_constant"),
    ({"averaging_constant": 1.5}, "averaging_constant"),
]


@pytest.mark.parametrize(("kwargs", "field_name"), BAD_ARGS, ids=str)
def test_invalid_args_name_field_value_and_expectation(kwargs: dict, field_name: str) -> None:
    bad_value = kwargs.get(field_name, DEFAULTS[field_name])
    with pytest.raises(ValueError) as info:
        QuantizationArgs(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field_name}={bad_value!r} is invalid: expected ")


@pytest.mark.parametrize(
    "args",
    [QuantizationArgs(), *INT_CASES, *FP8_CASES, QuantizationArgs(observer="mse")],
    ids=case_id,
)
def test_args_round_trip_through_dict(args: QuantizationArgs) -> None:
    assert QuantizationArgs.from_dict(args.to_dict()) == args


def test_args_to_dict_keeps_only_non_defaults() -> None:
    assert QuantizationArgs().to_dict() == {}
    assert QuantizationArgs(num_bits=4, symmetric=False).to_dict() == {
        "num_bits": 4,
        "symmetric": False,
    }


def test_args_from_dict_errors_name_where() -> None:
    where = "config_groups.group_0.weights"
    with pytest.raises(ValueError, match=rf"^{where}: unknown key\(s\) \['bits'\].*num_bits"):
        QuantizationArgs.from_dict({"bits": 4}, where)
    with pytest.raises(ValueError, match=rf"^{where}: num_bits=12 is invalid"):
        QuantizationArgs.from_dict({"num_bits": 12}, where)
    with pytest.raises(ValueError, match=rf"^{where}: expected a mapping"):
        QuantizationArgs.from_dict([4], where)


def test_scheme_round_trip_and_errors() -> None:
    scheme = preset_scheme("W4A8", ["Linear"])
    assert QuantizationScheme.from_dict(scheme.to_dict()) == scheme

    where = "config_groups.group_0"
    with pytest.raises(ValueError, match=rf"^{where}: unknown key\(s\) \['format'\].*targets"):
        QuantizationScheme.from_dict({"targets": ["Linear"], "format": "x"}, where)
    with pytest.raises(ValueError, match=rf"^{where}\.weights: num_bits=0"):
        QuantizationScheme.from_dict({"targets": ["Linear"], "weights": {"num_bits": 0}}, where)
    with pytest.raises(ValueError, match=rf"^{where}: targets=None"):
        QuantizationScheme.from_dict({}, where)


@pytest.mark.parametrize(
    ("roles", "field_name"),
    [
        ({"weights": QuantizationArgs(strategy="token", dynamic=True)}, "weights.strategy"),
        ({"input_activations": QuantizationArgs(strategy="channel")}, "input_activations."),
        ({"output_activations": QuantizationArgs(strategy="channel")}, "output_activations."),
    ],
)
def test_scheme_rejects_strategies_for_the_wrong_role(roles: dict, field_name: str) -> None:
    full = {"weights": None, "input_activations": None, **roles}
    with pytest.raises(ValueError, match=field_name):
        QuantizationScheme(targets=["Linear"], **full)


def test_scheme_rejects_empty_targets() -> None:
    with pytest.raises(ValueError, match=r"^targets=\[\] is invalid"):
        QuantizationScheme(targets=[], weights=None, input_activations=None)


INT8_TOKEN = ("int", 8, True, "token", None, True)
PRESET_TABLE = {
    # name: (weights, input_activations) as (type, bits, symmetric, strategy, group, dynamic)
    "W8A16": (("int", 8, True, "group", 128, False), None),
    "W4A16": (("int", 4, True, "group", 128, False), None),
    "W4A16_ASYM": (("int", 4, False, "group", 128, False), None),
    "W8A8": (("int", 8, True, "channel", None, False), INT8_TOKEN),
    "W4A8": (("int", 4, True, "group", 128, False), INT8_TOKEN),
    "FP8": (("float", 8, True, "tensor", None, False), ("float", 8, True, "tensor", None, False)),
    "FP8_DYNAMIC": (
        ("float", 8, True, "channel", None, False),
        ("float", 8, True, "token", None, True),
    ),
}


def summary(args: QuantizationArgs | None) -> tuple | None:
    if args is None:
        return None
    return (
        args.type,
        args.num_bits,
        args.symmetric,
        args.strategy,
        args.group_size,
        args.dynamic,
    )


@pytest.mark.parametrize("name", list(PRESET_TABLE))
def test_presets(name: str) -> None:
    scheme = preset_scheme(name.lower(), ["Linear"])
    assert (summary(scheme.weights), summary(scheme.input_activations)) == PRESET_TABLE[name]
    assert scheme.output_activations is None
    assert scheme.targets == ["Linear"]


def test_preset_names_and_unknown_preset() -> None:
    # the presets added with compressed-tensors 0.20's definitions: tests/modifiers/quantization/
    # test_formats.py compares them with compressed-tensors'
    assert set(PRESET_TABLE) <= set(PRESET_SCHEMES)
    with pytest.raises(ValueError, match=r"'W9A16'.*W4A16_ASYM"):
        preset_scheme("W9A16", ["Linear"])

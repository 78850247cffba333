"""fp4 formats (NVFP4, MXFP4): value grid, scales and presets, checked against slow references
and compressed-tensors' own definitions."""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs as CTArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as CT_PRESETS
from compressed_tensors.quantization.utils.helpers import calculate_qparams as ct_qparams
from compressed_tensors.quantization.utils.helpers import generate_gparam
from loguru import logger

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.calibration import quantize_layer
from lightning_compress.modifiers.quantization.formats import FORMATS, format_of
from lightning_compress.modifiers.quantization.formats.grids import FP4_E2M1, round_to_fp8_e4m3
from lightning_compress.modifiers.quantization.fused import fused_groups
from lightning_compress.modifiers.quantization.gptq import gptq_quantize
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import (
    compute_dynamic_qparams,
    dequantize,
    fake_quantize,
    global_scale,
    quantize,
    reduce_min_max,
)
from lightning_compress.modifiers.smoothing.awq import _weight_magnitude, awq_search
from lightning_compress.recipe import RecipeError

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""The non-negative fp4 e2m1 values; the index is the code, an even code an even mantissa."""
NVFP4 = preset_scheme("NVFP4A16", ["Linear"]).weights
MXFP4 = preset_scheme("MXFP4A16", ["Linear"]).weights


def e2m1_reference(value: float) -> float:
    """Nearest e2m1 value of ``value`` clamped to [-6, 6]; a tie goes to the even code."""
    magnitude = min(abs(value), 6.0)
    distances = [abs(magnitude - grid) for grid in E2M1]
    nearest = min(distances)
    codes = [code for code, distance in enumerate(distances) if distance == nearest]
    code = codes[0] if len(codes) == 1 else next(c for c in codes if c % 2 == 0)
    return math.copysign(E2M1[code], value)


def e8m0_reference(max_abs: float) -> float:
    """MX scale of a group: ``max_abs`` rounded to a power of two (up from a mantissa of 1.75),
    divided by 4 (fp4's largest power of two), its biased exponent clamped to a byte."""
    if max_abs == 0:
        return 2.0**-127
    exponent = math.floor(math.log2(max_abs))
    if max_abs / 2.0**exponent >= 1.75:
        exponent += 1
    biased = min(max(exponent - 2 + 127, 0), 255)
    return 2.0 ** (biased - 127)


def fp4_weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A weight whose rows span several orders of magnitude."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.logspace(-3, 1, 24).unsqueeze(1)
    return (torch.randn(24, 64, generator=generator) * rows).to(dtype)


def test_e2m1_rounding_matches_the_value_table_with_ties_to_even() -> None:
    midpoints = [(a + b) / 2 for a, b in zip(E2M1, E2M1[1:], strict=False)]
    values = midpoints + E2M1 + [0.1, 0.26, 1.3, 2.4, 4.9, 5.1, 7.0, 100.0]
    values += [-value for value in values]
    values += torch.randn(2000, generator=torch.Generator().manual_seed(1)).mul(3).tolist()
    x = torch.tensor(values)
    # a scale of 1: quantize only clamps and rounds each value (groups of 32 copies of it)
    codes = quantize(x.reshape(-1, 1).expand(-1, 32).contiguous(), torch.ones(1), None, MXFP4)
    codes = codes[:, 0]
    assert codes.dtype == torch.float8_e4m3fn
    assert codes.float().tolist() == [e2m1_reference(value) for value in values]
    assert [e2m1_reference(m) for m in midpoints] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [64, 4096], ids=["column", "input"])
def test_e2m1_grid_rounds_ties_and_their_neighbours_like_the_value_table(
    dtype: torch.dtype, length: int
) -> None:
    midpoints = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:], strict=False)])
    midpoints = midpoints.to(dtype)
    subnormal = torch.finfo(dtype).tiny / 4
    others = torch.tensor([*E2M1, -0.0, 0.1, 5.9, subnormal, -subnormal], dtype=dtype)
    around = [midpoints, others]
    for toward in (0.0, 7.0):  # the next numbers of the dtype below and above each midpoint
        around.append(torch.nextafter(midpoints, torch.full_like(midpoints, toward)))
    values = torch.cat(around)
    values = torch.cat([values, -values])
    random = torch.randn(length, generator=torch.Generator().manual_seed(2)).mul(3).clamp(-6, 6)
    x = torch.cat([values, random.to(dtype)])[:length]
    expected = [e2m1_reference(value) for value in x.tolist()]
    rounded = FP4_E2M1.round_(x.clone())
    assert rounded.dtype == dtype
    assert rounded.tolist() == expected
    assert rounded.signbit().tolist() == [math.copysign(1, v) < 0 for v in expected]


def e4m3_reference(value: float) -> float:
    """The nearest fp8 e4m3 value by search over the format's finite values, a tie going to
    the one with an even code (an even mantissa)."""
    if math.isnan(value):
        return math.nan
    best = min(
        E4M3_CODES,
        key=lambda code: (abs(E4M3_VALUES[code] - value), E4M3_VALUES[code] != 0, code % 2),
    )
    return (
        math.copysign(abs(E4M3_VALUES[best]), value)
        if E4M3_VALUES[best] == 0
        else E4M3_VALUES[best]
    )


def _e4m3_value(code: int) -> float:
    """The value of an fp8 e4m3fn code from its bits: bias 7, subnormals below exponent 1."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


E4M3_CODES = [code for code in range(256) if code & 0x7F != 0x7F]  # 0x7f / 0xff: NaN
E4M3_VALUES = {code: _e4m3_value(code) for code in E4M3_CODES}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_e4m3_rounding_matches_a_search_over_the_values_and_the_cast(
    dtype: torch.dtype,
) -> None:
    finite = sorted({value for value in E4M3_VALUES.values()})
    midpoints = torch.tensor([(a + b) / 2 for a, b in zip(finite, finite[1:], strict=False)])
    midpoints = midpoints.to(dtype)
    around = [midpoints, torch.tensor(finite, dtype=dtype), torch.tensor([-0.0, math.nan])]
    for toward in (-448.0, 448.0):  # the next numbers of the dtype on either side
        around.append(torch.nextafter(midpoints, torch.full_like(midpoints, toward)))
    generator = torch.Generator().manual_seed(3)
    random = torch.randn(4001, generator=generator) * torch.logspace(-4, 2, 4001)
    x = torch.cat([*(part.to(dtype) for part in around), random.clamp(-448, 448).to(dtype)])
    x = x.reshape(-1, 2)  # any shape
    rounded = round_to_fp8_e4m3(x)
    expected = [e4m3_reference(value) for value in x.flatten().tolist()]
    assert rounded.dtype == dtype and rounded.shape == x.shape
    got = rounded.flatten().tolist()
    assert [g for g in got if not math.isnan(g)] == [e for e in expected if not math.isnan(e)]
    assert [math.isnan(g) for g in got] == [math.isnan(e) for e in expected]
    assert rounded.signbit().tolist() == x.to(torch.float8_e4m3fn).to(dtype).signbit().tolist()
    assert torch.equal(rounded.nan_to_num(), x.to(torch.float8_e4m3fn).to(dtype).nan_to_num())


def test_fp8_e4m3_rounding_in_place_writes_the_cast_values_into_contiguous_input() -> None:
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(4)).mul(100)
    expected = x.to(torch.float8_e4m3fn).float()
    written = x.clone()
    assert round_to_fp8_e4m3(written, in_place=True) is written
    assert torch.equal(written, expected)
    transposed = x.T  # not contiguous: a new tensor, the input left as it was
    rounded = round_to_fp8_e4m3(transposed, in_place=True)
    assert rounded is not transposed and torch.equal(rounded, expected.T)
    assert torch.equal(transposed, x.T)


@pytest.mark.parametrize("length", [8, 4096], ids=["column", "input"])
def test_e2m1_grid_keeps_nan(length: int) -> None:
    x = torch.zeros(length)
    x[3] = torch.nan
    assert torch.isnan(FP4_E2M1.round_(x))[3]


def test_e2m1_grid_refuses_a_dtype_without_a_known_bit_layout() -> None:
    with pytest.raises(ValueError, match="float32 or float64 tensor, got torch.float8_e4m3fn"):
        FP4_E2M1.round_(torch.zeros(4, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_scales_are_e8m0_powers_of_two_of_each_group_of_32(dtype: torch.dtype) -> None:
    weight = fp4_weight(dtype)
    weight[3, :32] = 0  # a zero group
    weight[4, :32] = 0
    weight[4, 5] = 7.0  # mantissa 1.75: rounds up to 8, scale 2
    weight[5, :32] = 0
    weight[5, 7] = -6.0  # mantissa 1.5: rounds down to 4, scale 1
    scale, zero_point = qparams_for_weight(weight, MXFP4)
    assert scale.shape == (24, 2) and scale.dtype == dtype
    max_abs = weight.float().abs().unflatten(-1, (2, 32)).amax(-1)
    expected = [[e8m0_reference(float(m)) for m in row] for row in max_abs]
    assert scale.float().tolist() == expected
    assert scale[4, 0] == 2 and scale[5, 0] == 1
    assert not zero_point.any()


@pytest.mark.parametrize("fmt", ["MXFP4A16", "MXFP8A16"])
def test_mx_qparams_and_round_trip_equal_compressed_tensors(fmt: str) -> None:
    args = preset_scheme(fmt, ["Linear"]).weights
    weight = fp4_weight(torch.bfloat16) * 100  # fp8's E8M0 offset is 8: larger scales
    scale, zero_point = qparams_for_weight(weight, args)
    ct_args = CTArgs(**{**args.to_dict(), "scale_dtype": torch.uint8})
    ct_scale, _ = ct_qparams(*reduce_min_max(weight, args), ct_args)
    assert torch.equal(scale, ct_scale)
    expected = ct_fake_quantize(weight, ct_scale, zero_point, ct_args)
    assert torch.equal(fake_quantize(weight, scale, zero_point, args), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_scales_are_fp8_group_scales_times_a_global_scale(dtype: torch.dtype) -> None:
    weight = fp4_weight(dtype)
    tensor_scale = global_scale(weight, NVFP4, "w")
    assert tensor_scale.shape == (1,) and tensor_scale.dtype == torch.float32
    max_abs = weight.abs().amax()
    assert tensor_scale.item() == pytest.approx(448 * 6 / max_abs.item(), rel=1e-2)
    scale, _ = qparams_for_weight(weight, NVFP4, global_scale=tensor_scale)
    assert scale.shape == (24, 4) and scale.dtype == dtype
    # slow reference, group by group: global * max|group| / 6, rounded to fp8 e4m3
    groups = weight.unflatten(-1, (4, 16))
    for row in range(24):
        for group in range(4):
            local = groups[row, group].abs().amax() / 6
            stored = tensor_scale * local.float()
            fp8 = stored.clamp(-448, 448).to(torch.float8_e4m3fn).float()
            assert scale[row, group].float() == (fp8 if fp8 > 0 else 0.125)
    assert scale.float().amax() == 448  # the largest group maps onto fp8's largest value


def test_nvfp4_qparams_and_round_trip_equal_compressed_tensors() -> None:
    weight = fp4_weight(torch.bfloat16)
    min_vals, max_vals = reduce_min_max(weight, NVFP4)
    tensor_scale = global_scale(weight, NVFP4, "w")
    ct_global = generate_gparam(weight.amin().reshape(1), weight.amax().reshape(1))
    assert torch.equal(tensor_scale, ct_global)
    ct_args = CTArgs(**{**NVFP4.to_dict(), "scale_dtype": torch.float8_e4m3fn})
    ct_scale, _ = ct_qparams(min_vals, max_vals, ct_args, global_scale=ct_global)
    scale, zero_point = qparams_for_weight(weight, NVFP4, global_scale=tensor_scale)
    assert torch.equal(scale.float(), ct_scale)  # compressed-tensors keeps them in float32
    expected = ct_fake_quantize(weight, ct_scale, None, ct_args, global_scale=tensor_scale)
    assert torch.equal(fake_quantize(weight, scale, zero_point, NVFP4, tensor_scale), expected)


@pytest.mark.parametrize("fill", [0.0, float("nan"), float("inf")])
def test_nvfp4_refuses_a_weight_that_is_all_zero_or_not_finite(fill: float) -> None:
    layer = torch.nn.Linear(32, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = fill
    what = "all zero" if fill == 0 else "not finite"
    with pytest.raises(ValueError, match=rf"layer 'model.q_proj' weight is {what}"):
        quantize_layer(layer, preset_scheme("NVFP4A16", ["Linear"]), None, "model.q_proj")


def test_nvfp4_quantized_layer_holds_its_global_scale() -> None:
    layer = torch.nn.Linear(32, 4)
    result = quantize_layer(layer, preset_scheme("NVFP4A16", ["Linear"]), None, "q")
    assert set(result.buffers) == {"weight_scale", "weight_zero_point", "weight_global_scale"}
    buffers = result.buffers
    expected = fake_quantize(
        layer.weight, buffers["weight_scale"], None, NVFP4, buffers["weight_global_scale"]
    )
    assert torch.equal(result.weight, expected)


def test_nvfp4_is_refused_where_no_global_scale_is_computed() -> None:
    weight = fp4_weight()
    with pytest.raises(ValueError, match="tensor_group.*dynamic qparams need one"):
        compute_dynamic_qparams(weight, NVFP4)
    with pytest.raises(ValueError, match="global_scale is required"):
        qparams_for_weight(weight, NVFP4)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}, "num_bits"),
        (
            {
                "num_bits": 4,
                "type": "float",
                "strategy": "group",
                "group_size": 16,
                "scale_dtype": "uint8",
            },
            "group_size",
        ),
        (
            {
                "num_bits": 4,
                "type": "float",
                "strategy": "group",
                "group_size": 16,
                "scale_dtype": "float8_e4m3fn",
            },
            "strategy",
        ),
        (
            {"num_bits": 4, "strategy": "group", "group_size": 16, "scale_dtype": "uint8"},
            "scale_dtype",
        ),
        ({"strategy": "tensor_group"}, "group_size"),
    ],
    ids=str,
)
def test_invalid_fp4_args_name_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field_name}=.* is invalid: expected "):
        QuantizationArgs(**kwargs)


def test_format_registry_has_one_row_per_combination() -> None:
    keys = [(f.type, bits, f.scale_dtype) for f in FORMATS for bits in f.num_bits]
    assert len(keys) == len(set(keys))
    assert format_of("float", 4, "float8_e4m3fn").compressor == "nvfp4-pack-quantized"
    assert format_of("float", 4, "uint8").compressor == "mxfp4-pack-quantized"
    with pytest.raises(ValueError, match="must be one of"):
        format_of("float", 6)


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_presets_have_compressed_tensors_definitions(name: str) -> None:
    ours = PRESET_SCHEMES[name]
    theirs = {role: args for role, args in CT_PRESETS[name].items() if args is not None}
    assert set(ours) == set(theirs)
    for role, args in ours.items():
        ct = theirs[role]
        fields = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
        blocks = None if ct.block_structure is None else tuple(ct.block_structure)
        assert args.block_structure == blocks
        assert {f: getattr(args, f) for f in fields} == {f: getattr(ct, f) for f in fields}
        # compressed-tensors also sets scale_dtype where it picks no format of its own (fp8)
        mx_or_nv = ct.scale_dtype in (torch.uint8, torch.float8_e4m3fn) and ct.group_size
        assert args.scale_dtype == (str(ct.scale_dtype)[6:] if mx_or_nv else None)


@pytest.mark.parametrize(("scheme", "size"), [("NVFP4A16", 16), ("MXFP4A16", 32)])
def test_a_group_that_does_not_divide_a_layer_names_the_layer(scheme: str, size: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 24))
    session = CompressionSession()
    error = rf"group_size \[{size}\] does not divide the input features of \['1 \(in_features=8"
    with pytest.raises(RecipeError, match=error):
        session.initialize(
            recipe=QuantizationModifier(scheme=scheme, targets=["Linear"]), model=model
        )


@pytest.mark.parametrize("actorder", [None, "weight"])
@pytest.mark.parametrize("fmt", ["MXFP4A16", "NVFP4A16"])
def test_gptq_quantizes_fp4_onto_its_grid_and_beats_rtn(fmt: str, actorder: str | None) -> None:
    generator = torch.Generator().manual_seed(2)
    weight = fp4_weight()
    inputs = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    args = preset_scheme(fmt, ["Linear"]).weights
    result = gptq_quantize(weight, hessian, args, actorder=actorder)
    tensor_scale = result.global_scale
    assert result.scale.shape == (24, 64 // args.group_size)
    if fmt == "MXFP4A16":
        assert tensor_scale is None
        assert torch.equal(result.scale.log2(), result.scale.log2().round())  # powers of two
    else:
        assert torch.equal(tensor_scale, global_scale(weight, args, "w"))
        assert torch.equal(result.scale.to(torch.float8_e4m3fn).float(), result.scale)
    on_grid = fake_quantize(result.weight_q, result.scale, result.zero_point, args, tensor_scale)
    assert torch.equal(on_grid, result.weight_q)
    rtn_qparams = qparams_for_weight(weight, args, global_scale=tensor_scale)
    rtn = fake_quantize(weight, *rtn_qparams, args, tensor_scale)

    def output_error(quantized: torch.Tensor) -> float:
        return float(((quantized - weight) @ inputs.T).pow(2).sum())

    assert output_error(result.weight_q) < output_error(rtn)


def test_quantization_aware_training_of_nvfp4_bakes_weights_on_its_grid() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    session = CompressionSession()
    session.initialize(
        recipe=QuantizationModifier(scheme="NVFP4A16", targets=["Linear"], start=0), model=model
    )
    session.event(EventType.BATCH_START, global_step=0)
    model(torch.randn(2, 64)).sum().backward()
    trained = model[0].parametrizations.weight.original.detach().clone()
    session.finalize()
    layer = model[0]
    args, tensor_scale = layer.quantization_scheme.weights, layer.weight_global_scale
    # the global scale is the float weight's; recomputed from the baked weight it may differ
    # by an ulp, since baking moves the largest value by a rounding of 448 * 6 / max|w|
    assert torch.equal(tensor_scale, global_scale(trained, args, "w"))
    expected = fake_quantize(trained, layer.weight_scale, None, args, tensor_scale)
    assert torch.equal(layer.weight, expected)
    baked = fake_quantize(layer.weight, layer.weight_scale, None, args, tensor_scale)
    assert torch.equal(baked, layer.weight)


BLOCK = QuantizationArgs(type="float", strategy="block", block_structure=(4, 8))


def test_block_scales_cover_tiles_and_round_trip_per_tile() -> None:
    weight = fp4_weight()[:12, :16]
    scale, zero_point = qparams_for_weight(weight, BLOCK)
    assert scale.shape == (3, 2)
    x_hat = fake_quantize(weight, scale, zero_point, BLOCK)
    for row in range(3):
        for column in range(2):
            tile = weight[row * 4 : (row + 1) * 4, column * 8 : (column + 1) * 8]
            tile_scale = tile.abs().amax() / 448
            assert scale[row, column] == tile_scale
            expected = (tile / tile_scale).to(torch.float8_e4m3fn).float() * tile_scale
            got = x_hat[row * 4 : (row + 1) * 4, column * 8 : (column + 1) * 8]
            assert torch.equal(got, expected)
    codes = quantize(weight, scale, zero_point, BLOCK)
    assert torch.equal(dequantize(codes, scale, zero_point, BLOCK), x_hat)


def test_fp8_block_round_trip_equals_compressed_tensors() -> None:
    weight = torch.randn(256, 384, generator=torch.Generator().manual_seed(3)).bfloat16()
    args = preset_scheme("FP8_BLOCK", ["Linear"]).weights
    scale, zero_point = qparams_for_weight(weight, args)
    assert scale.shape == (2, 3)
    ct_args = CTArgs(**args.to_dict())
    expected = ct_fake_quantize(weight, scale, zero_point, ct_args)
    assert torch.equal(fake_quantize(weight, scale, zero_point, args), expected)


def test_fp8_blocks_pad_a_weight_they_do_not_tile_as_compressed_tensors_does() -> None:
    weight = torch.randn(200, 300, generator=torch.Generator().manual_seed(5)).bfloat16()
    args = preset_scheme("FP8_BLOCK", ["Linear"]).weights
    scale, zero_point = qparams_for_weight(weight, args)
    assert scale.shape == (2, 3)  # ceil(200 / 128) x ceil(300 / 128)
    for row in range(2):  # each tile's scale from the weights inside it
        for column in range(3):
            tile = weight[row * 128 : (row + 1) * 128, column * 128 : (column + 1) * 128]
            assert scale[row, column] == tile.float().abs().amax().bfloat16() / 448
    expected = ct_fake_quantize(weight, scale, zero_point, CTArgs(**args.to_dict()))
    x_hat = fake_quantize(weight, scale, zero_point, args)
    assert x_hat.shape == weight.shape and torch.equal(x_hat, expected)
    codes = quantize(weight, scale, zero_point, args)
    assert codes.shape == weight.shape
    assert torch.equal(dequantize(codes, scale, zero_point, args), x_hat)


def test_gptq_quantizes_a_weight_its_blocks_do_not_tile_onto_padded_tiles() -> None:
    weight = fp4_weight()[:22, :60]  # tiles of 4 x 8: the last row and column of tiles padded
    inputs = torch.randn(256, 60, generator=torch.Generator().manual_seed(6))
    result = gptq_quantize(weight, 2 * inputs.T @ inputs / 256, BLOCK)
    scale, zero_point = qparams_for_weight(weight, BLOCK)
    assert scale.shape == (6, 8) and torch.equal(result.scale, scale)
    on_grid = fake_quantize(result.weight_q, result.scale, result.zero_point, BLOCK)
    assert torch.equal(on_grid, result.weight_q)


def test_padded_blocks_are_named_in_a_warning_with_the_layers_vllm_refuses() -> None:
    model = torch.nn.ModuleDict(
        {
            "q_proj": torch.nn.Linear(128, 96),
            "v_proj": torch.nn.Linear(128, 96),
            "o_proj": torch.nn.Linear(96, 128),
            "down_proj": torch.nn.Linear(256, 128),
        }
    )
    blocks = {"type": "float", "strategy": "block", "block_structure": [128, 128]}
    recipe = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": blocks}})
    messages = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        CompressionSession().initialize(recipe=recipe, model=model)
    finally:
        logger.remove(sink)
    (warning,) = [message for message in messages if "does not tile" in message]
    assert "['q_proj (96x128)', 'v_proj (96x128)', 'o_proj (128x96)']" in warning
    assert "padded with zeros" in warning
    assert "'q_proj': 'fused with a later sibling" in warning  # v_proj, the last, is loaded
    assert "'o_proj': 'input features not whole blocks" in warning


def test_fp8_block_preset_refuses_input_features_its_activation_groups_do_not_divide() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.Linear(96, 128))
    with pytest.raises(RecipeError, match=r"does not divide the input features of \['1 \(in_"):
        CompressionSession().initialize(
            recipe=QuantizationModifier(scheme="FP8_BLOCK", targets=["Linear"]), model=model
        )


def test_block_and_scheme_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^block_structure=None is invalid"):
        QuantizationArgs(type="float", strategy="block")
    with pytest.raises(ValueError, match=r"^input_activations.strategy='block' is invalid"):
        QuantizationScheme(targets=["Linear"], weights=None, input_activations=BLOCK)


def test_fused_groups_are_the_siblings_vllm_fuses() -> None:
    names = [
        "m.0.attn.q_proj",
        "m.0.attn.k_proj",
        "m.0.attn.v_proj",
        "m.0.attn.o_proj",
        "m.0.mlp.gate_proj",
        "m.0.mlp.up_proj",
        "m.0.mlp.down_proj",
        "m.1.attn.q_proj",
        "m.0.moe.experts.3.w1",
        "m.0.moe.experts.3.w3",
        "m.0.moe.experts.4.w1",
    ]
    assert fused_groups(names) == [
        names[:3],
        ["m.0.attn.o_proj"],
        names[4:6],
        ["m.0.mlp.down_proj"],
        ["m.1.attn.q_proj"],
        names[8:10],
        ["m.0.moe.experts.4.w1"],
    ]


@pytest.mark.parametrize("actorder", [None, "weight"])
def test_gptq_quantizes_fp8_blocks_onto_their_tiles_and_beats_rtn(actorder: str | None) -> None:
    generator = torch.Generator().manual_seed(4)
    weight = fp4_weight()  # 24 x 64: tiles of 4 x 8
    inputs = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    result = gptq_quantize(weight, hessian, BLOCK, actorder=actorder)
    scale, zero_point = qparams_for_weight(weight, BLOCK)
    assert torch.equal(result.scale, scale)  # tile scales from the weight, fixed up front
    on_grid = fake_quantize(result.weight_q, result.scale, result.zero_point, BLOCK)
    assert torch.equal(on_grid, result.weight_q)
    rtn = fake_quantize(weight, scale, zero_point, BLOCK)

    def output_error(quantized: torch.Tensor) -> float:
        return float(((quantized - weight) @ inputs.T).pow(2).sum())

    assert output_error(result.weight_q) < output_error(rtn)


def test_awq_weight_magnitude_normalizes_by_each_tile() -> None:
    weight = fp4_weight()[:8, :16]
    magnitude = _weight_magnitude(weight, BLOCK)
    expected = torch.zeros(16)
    for column in range(16):
        for row in range(8):
            tile = weight[row // 4 * 4 : row // 4 * 4 + 4, column // 8 * 8 : column // 8 * 8 + 8]
            expected[column] += weight[row, column].abs() / (tile.abs().max() + 1e-6) / 8
    torch.testing.assert_close(magnitude, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["NVFP4A16", "MXFP4A16", "FP8_BLOCK"])
def test_awq_searches_scales_for_the_new_formats(fmt: str) -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=generator)
    x[:, [3, 100]] *= 30  # salient channels
    weights = [torch.randn(128, 256, generator=generator) for _ in range(2)]
    args = preset_scheme(fmt, ["Linear"]).weights
    hessian = 2 * x.T @ x / x.shape[0]
    result = awq_search(weights, [hessian] * 2, x.abs().mean(dim=0), args, n_grid=8)
    assert result.loss < result.unscaled_loss

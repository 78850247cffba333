"""MXFP6 (fp6 e2m3 values in groups of 32 with E8M0 scales): the format added as one grid, one
scale setting and one table row, checked against slow references."""

from __future__ import annotations

import math

import torch

from lightning_compress.modifiers.quantization.args import preset_scheme
from lightning_compress.modifiers.quantization.formats import format_of
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import fake_quantize

E2M3 = sorted(
    {m / 8 for m in range(8)}
    | {(1 + m / 8) * 2.0 ** (e - 1) for e in range(1, 4) for m in range(8)}
)
"""Every fp6 e2m3 magnitude: the subnormals m/8 and the normals (1 + m/8) * 2**(e-1)."""


def slow_fp6(value: float) -> float:
    """The nearest e2m3 value (clamped to 7.5); a tie goes to the one with the even code."""
    magnitude = min(abs(value), 7.5)
    distances = [abs(v - magnitude) for v in E2M3]
    best = min(distances)
    codes = [code for code, d in enumerate(distances) if d == best]
    code = next((c for c in codes if c % 2 == 0), codes[0])
    return math.copysign(E2M3[code], value)


def slow_mx_scale(largest: float) -> float:
    """``2 ** (round(log2 max) - 2)``, rounding up only from a mantissa of 1.9375 (where the
    largest value would round past 7.5)."""
    if largest == 0:
        return 1.0
    mantissa, exponent = math.frexp(largest)
    power = exponent - 1 + (1 if 2 * mantissa >= 1.9375 else 0)
    return 2.0 ** (power - 2)


def test_the_table_holds_the_32_magnitudes_of_e2m3() -> None:
    assert len(E2M3) == 32 and E2M3[:3] == [0.0, 0.125, 0.25] and E2M3[-1] == 7.5


def test_fp6_rounding_matches_the_table() -> None:
    grid = format_of("float", 6, "uint8").grid
    x = torch.linspace(-8, 8, 4097, dtype=torch.float64)  # every tie among them
    got = grid.round_(x.clamp(-7.5, 7.5))
    assert got.tolist() == [slow_fp6(v) for v in x.tolist()]


def test_mxfp6_weights_match_the_slow_reference() -> None:
    args = preset_scheme("MXFP6A16", ["Linear"]).weights
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    weight[0, :32] *= 1.9375 / weight[0, :32].abs().max()  # a group max on the threshold
    scale, zero_point = qparams_for_weight(weight, args)
    got = fake_quantize(weight, scale, zero_point, args)
    expected = torch.empty_like(weight)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], 32):
            group = weight[row, start : start + 32].tolist()
            step = slow_mx_scale(max(abs(v) for v in group))
            expected[row, start : start + 32] = torch.tensor(
                [slow_fp6(v / step) * step for v in group]
            )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)

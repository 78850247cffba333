"""What counts as a pruned weight: zeros of either sign, in any float dtype and layout."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.modifiers.pruning.structure import is_pruned, zero_count

SEED = 20261206


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_zero_count_equals_the_elements_equal_to_zero(dtype, transposed):
    generator = torch.Generator().manual_seed(SEED)
    values = torch.randn(40, 24, generator=generator) * 3
    values[values.abs() < 1.0] = 0.0
    values[:, :3] = -0.0
    if dtype.is_floating_point:
        values[1, 5], values[2, 5], values[3, 5] = float("nan"), float("inf"), float("-inf")
    weight = values.to(dtype)
    if transposed:
        weight = weight.t()
    assert zero_count(weight) == int((weight == 0).sum())


def test_a_weight_with_half_its_values_negative_zeros_is_pruned():
    weight = -torch.rand(8, 8, dtype=torch.bfloat16) - 0.1
    weight[:, ::2] *= 0  # -0.0
    assert torch.signbit(weight[0, 0])
    assert is_pruned(weight)
    assert not is_pruned(weight[:, 1::2].contiguous())

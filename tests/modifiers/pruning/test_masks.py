"""Mask selection and sparsity schedules against slow, loop-by-loop references."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.modifiers.pruning import (
    global_masks,
    interpolate_sparsity,
    nm_mask,
    parse_mask_structure,
    unstructured_mask,
    update_point,
)
from lightning_compress.modifiers.pruning.masks import nm_mask_of_run


def pruned_positions(values: list[float], count: int) -> set[int]:
    """The ``count`` smallest values' positions; among equal values the lower index first."""
    ranked = sorted(range(len(values)), key=lambda i: (values[i], i))
    return set(ranked[:count])


def reference_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    values = scores.flatten().tolist()
    pruned = pruned_positions(values, round(sparsity * len(values)))
    keep = [i not in pruned for i in range(len(values))]
    return torch.tensor(keep).view(scores.shape)


def reference_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.ones(scores.shape, dtype=torch.bool)
    rows, cols = scores.shape
    for row in range(rows):
        for first in range(0, cols, m):
            group = scores[row, first : first + m].tolist()
            for offset in pruned_positions(group, m - n):
                keep[row, first + offset] = False
    return keep


def reference_global(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    values = [v for tensor in scores.values() for v in tensor.flatten().tolist()]
    pruned = pruned_positions(values, round(sparsity * len(values)))
    result, offset = {}, 0
    for name, tensor in scores.items():
        keep = [offset + i not in pruned for i in range(tensor.numel())]
        result[name] = torch.tensor(keep).view(tensor.shape)
        offset += tensor.numel()
    return result


@pytest.fixture
def scores() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(12, 16).abs()


@pytest.fixture
def tied() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 3, (12, 16)).float()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.37, 0.99, 1.0])
def test_unstructured_prunes_exactly_the_smallest(scores, tied, sparsity):
    for values in (scores, tied):
        mask = unstructured_mask(values, sparsity)
        assert mask.dtype == torch.bool and mask.shape == values.shape
        assert (~mask).sum() == round(sparsity * values.numel())
        assert torch.equal(mask, reference_unstructured(values, sparsity))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2), (5, 16), (15, 16)])
def test_nm_keeps_n_largest_of_every_m(scores, tied, n, m):  # m = 16: selection, not a sort
    for values in (scores, tied):
        mask = nm_mask(values, n, m)
        assert torch.equal(mask, reference_nm(values, n, m))
        assert (mask.view(12, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nm_mask_of_one_transposed_run_equals_the_reference(scores, tied, n, m, dtype):
    zeros = torch.zeros(12, 16)
    zeros[::3, 1::2] = 1.0  # ties at 0 and at 1 (non-negative scores, like saliencies)
    for values in (scores, tied, zeros):
        for first in range(0, 16, m):
            run = values[:, first : first + m].to(dtype)
            mask = nm_mask_of_run(run.T.contiguous(), n)
            assert mask.shape == (m, 12)
            assert torch.equal(mask.T, reference_nm(run, n, m))


def test_global_uses_one_threshold(scores, tied):
    layers = {"a": scores, "b": scores[:4] * 3, "c": tied}
    masks = global_masks(layers, 0.6)
    reference = reference_global(layers, 0.6)
    assert all(torch.equal(masks[name], reference[name]) for name in layers)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * 12 * 16 * 2 + 0.6 * 64)
    kept_small = masks["a"].sum() / masks["a"].numel()
    assert kept_small < masks["b"].sum() / masks["b"].numel()  # larger weights keep more
    assert global_masks({}, 0.5) == {}


def test_ties_are_broken_the_same_way_every_time():
    flat = torch.zeros(10)
    assert unstructured_mask(flat, 0.3).tolist() == [False] * 3 + [True] * 7
    assert nm_mask(torch.zeros(1, 4), 2, 4).tolist() == [[False, False, True, True]]


def test_masks_are_monotone_in_sparsity(tied):
    previous = torch.ones_like(tied, dtype=torch.bool)
    for sparsity in torch.linspace(0, 1, 11).tolist():
        mask = unstructured_mask(tied, sparsity)
        assert not (mask & ~previous).any()  # nothing pruned before comes back
        previous = mask


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: unstructured_mask(torch.ones(4), 1.5), r"sparsity: expected a float in \[0, 1\]"),
        (lambda: global_masks({"a": torch.ones(4)}, -0.1), "sparsity: expected"),
        (lambda: nm_mask(torch.ones(2, 8), 4, 4), "expected 0 < N < M, got N=4, M=4"),
        (
            lambda: nm_mask(torch.ones(2, 6), 2, 4, layer="mlp.up"),
            r"layer 'mlp.up' has shape \(2, 6\); expected a 2-D .* divisible by 4",
        ),
        (lambda: nm_mask(torch.ones(8), 2, 4), r"scores has shape \(8,\); expected a 2-D"),
    ],
)
def test_mask_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("text", "expected"), [("0:0", None), ("2:4", (2, 4)), ("1:2", (1, 2)), ("16:32", (16, 32))]
)
def test_parse_mask_structure(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "2", "a:b", "-1:4", "2:4:8", "", "0.5"])
def test_parse_mask_structure_rejects_malformed(text):
    with pytest.raises(ValueError, match=r"mask_structure: expected 'N:M' with 0 < N < M"):
        parse_mask_structure(text)


@pytest.mark.parametrize("inter_func", ["cubic", "linear"])
def test_interpolate_sparsity(inter_func):
    power = 3 if inter_func == "cubic" else 1
    for step in range(2, 13):
        progress = (step - 2) / 10
        expected = 0.8 + (0.1 - 0.8) * (1 - progress) ** power
        got = interpolate_sparsity(step, 2, 12, 0.1, 0.8, inter_func)
        assert got == pytest.approx(expected, abs=1e-12)
    assert interpolate_sparsity(0, 2, 12, 0.1, 0.8, inter_func) == 0.1
    assert interpolate_sparsity(12, 2, 12, 0.1, 0.8, inter_func) == 0.8  # exactly
    assert interpolate_sparsity(99, 2, 12, 0.1, 0.8, inter_func) == 0.8


def test_interpolate_sparsity_rejects_unknown_function():
    with pytest.raises(ValueError, match=r"inter_func: expected one of \['cubic', 'linear'\]"):
        interpolate_sparsity(1, 0, 2, 0.0, 0.5, "quadratic")


@pytest.mark.parametrize(
    ("current", "start", "update", "expected"),
    [
        (1.0, 1.0, None, 1.0),
        (0.5, 1.0, None, 1.0),  # before start: start
        (3.5, 1.0, None, 3.5),
        (2.9, 1.0, 1.0, 2.0),
        (1.5, 1.0, 3.0, 1.0),  # between start and the first multiple: start
        (0.3, 0.25, 0.1, 0.3),  # 0.3 / 0.1 < 3 in floats
        (8.5, 1.0, 3.0, 6.0),
        (9.5, 1.0, 3.0, 9.5),  # at or after end: end
        (20.0, 1.0, 3.0, 9.5),
    ],
)
def test_update_point(current, start, update, expected):
    assert update_point(current, start, 9.5, update) == pytest.approx(expected)

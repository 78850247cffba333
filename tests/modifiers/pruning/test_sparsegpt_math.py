"""SparseGPT against a slow, obviously correct reference: one column at a time, full inverse."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.modifiers.pruning.masks import nm_mask, unstructured_mask
from lightning_compress.modifiers.pruning.sparsegpt import sparsegpt_prune
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.ops import calculate_qparams, fake_quantize

OUT, IN, DAMP = 16, 64, 0.01
INT4 = QuantizationArgs(num_bits=4, strategy="channel", symmetric=False)


def layer(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs with strongly correlated features (rank 6 plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=gen) @ torch.randn(6, IN, generator=gen)
    x = x + 0.1 * torch.randn(256, IN, generator=gen)
    return torch.randn(OUT, IN, generator=gen).to(dtype), x.to(dtype)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


# --- the reference ---


def ref_select(scores: torch.Tensor, sparsity: float, structure: tuple[int, int] | None):
    """Keep mask: the ``n`` largest of every ``m`` in a row, or all but the smallest
    ``round(sparsity * numel)`` of the whole block."""
    if structure is not None:
        n, m = structure
        groups = scores.reshape(scores.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.argsort(dim=-1, descending=True, stable=True)[..., :n], True)
        return keep.reshape(scores.shape)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort(stable=True)[: round(sparsity * scores.numel())]] = False
    return keep.reshape(scores.shape)


def ref_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: tuple[int, int] | None,
    block_size: int,
    quantize: QuantizationArgs | None = None,
    existing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT as the paper states it, with ``inv(H[j:, j:])`` at every column.

    The saliency of weight ``w`` in column ``k`` is ``w^2 / inv(H[k:, k:])[0, 0]``; masks are
    chosen on entering each block (unstructured) or each run of ``m`` columns (N:M). The
    ``existing`` zeros (bool ``[out, in]``) are pruned first and always.
    Returns ``(weight, mask, loss)``.
    """
    w, h = weight.double().clone(), hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * h.diagonal().mean() * torch.eye(IN, dtype=h.dtype)
    d = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(IN)])
    if quantize is not None:
        scale, zero_point = calculate_qparams(
            w.amin(1, keepdim=True), w.amax(1, keepdim=True), quantize
        )
    span = structure[1] if structure is not None else block_size
    mask, loss = torch.ones_like(w, dtype=torch.bool), 0.0
    for j in range(IN):
        if j % span == 0:
            cols = slice(j, j + span)
            scores = w[:, cols].square() / d[cols]
            if existing is not None:
                scores = scores.masked_fill(existing[:, cols], float("-inf"))
            mask[:, cols] = ref_select(scores, sparsity, structure)
            if existing is not None:
                mask[:, cols] &= ~existing[:, cols]
        hinv = torch.linalg.inv(h[j:, j:])
        q = w[:, j] * mask[:, j]
        if quantize is not None:
            q = fake_quantize(q[:, None], scale, zero_point, quantize)[:, 0]
        loss += ((w[:, j] - q).square().sum() / hinv[0, 0] / 2).item()
        w[:, j:] -= ((w[:, j] - q) / hinv[0, 0])[:, None] * hinv[0]
        w[:, j] = q
    return w, mask, loss


# --- blocked result equals the reference ---

CASES = [
    (0.5, None, 16),
    (0.5, None, 24),
    (0.3, None, 24),
    (0.5, (2, 4), 16),
    (0.5, (2, 4), 6),  # N:M runs straddle block boundaries
    (0.75, (1, 4), 24),
]


@pytest.mark.parametrize(("sparsity", "structure", "block_size"), CASES)
def test_blocked_sparsegpt_equals_column_loop_reference(
    sparsity: float, structure: tuple[int, int] | None, block_size: int
) -> None:
    weight, x = layer()
    hessian = hessian_of(x)
    result = sparsegpt_prune(weight, hessian, sparsity, structure, block_size, DAMP)
    ref_weight, ref_mask, ref_loss = ref_sparsegpt(weight, hessian, sparsity, structure, block_size)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_weight, rtol=1e-10, atol=1e-10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert (result.weight[~result.mask] == 0).all()
    assert result.scale is None and result.zero_point is None


@pytest.mark.parametrize("structure", [None, (2, 4)])
def test_stacked_weights_with_row_groups_equal_separate_calls(structure) -> None:
    weight, x = layer(3)
    hessian = hessian_of(x)
    parts = [weight[:5], weight[5:]]
    stacked = sparsegpt_prune(
        weight, hessian, 0.5, structure, block_size=8, row_groups=[5, weight.shape[0] - 5]
    )
    alone = [sparsegpt_prune(part, hessian, 0.5, structure, block_size=8) for part in parts]
    assert torch.equal(stacked.mask, torch.cat([result.mask for result in alone]))
    expected = torch.cat([result.weight for result in alone])
    torch.testing.assert_close(stacked.weight, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_structure_holds_in_every_row_group(n: int, m: int) -> None:
    weight, x = layer(1, torch.float32)
    result = sparsegpt_prune(weight, hessian_of(x), 1 - n / m, (n, m))
    kept = result.mask.reshape(OUT, IN // m, m).sum(-1)
    assert (kept == n).all()
    assert ((result.weight != 0) == result.mask).all()


@pytest.mark.parametrize("block_size", [16, 24, 128])
def test_unstructured_sparsity_is_exact_in_every_block(block_size: int) -> None:
    weight, x = layer(2, torch.float32)
    result = sparsegpt_prune(weight, hessian_of(x), 0.3, block_size=block_size)
    for first in range(0, IN, block_size):
        block = result.mask[:, first : first + block_size]
        assert (~block).sum().item() == round(0.3 * block.numel())


def test_joint_quantization_equals_reference_and_keeps_zeros() -> None:
    weight, x = layer(3)
    hessian = hessian_of(x)
    result = sparsegpt_prune(weight, hessian, 0.5, (2, 4), 16, DAMP, quantize_args=INT4)
    ref_weight, ref_mask, _ = ref_sparsegpt(weight, hessian, 0.5, (2, 4), 16, INT4)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_weight, rtol=1e-10, atol=1e-10)
    assert (result.weight[~result.mask] == 0).all()
    again = fake_quantize(result.weight, result.scale, result.zero_point, INT4)
    assert torch.equal(again, result.weight)


@pytest.mark.parametrize(("structure", "block_size"), [(None, 16), (None, 24), ((2, 4), 16)])
def test_preserved_mask_keeps_every_existing_zero_and_equals_reference(
    structure: tuple[int, int] | None, block_size: int
) -> None:
    weight, x = layer(4)
    hessian = hessian_of(x)
    gen = torch.Generator().manual_seed(5)
    weight[torch.rand(weight.shape, generator=gen) < 0.3] = 0  # an earlier, unrelated pruning
    existing = weight == 0
    result = sparsegpt_prune(weight, hessian, 0.5, structure, block_size, preserve_mask=True)
    ref_weight, ref_mask, ref_loss = ref_sparsegpt(
        weight, hessian, 0.5, structure, block_size, existing=existing
    )
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_weight, rtol=1e-10, atol=1e-10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert (result.weight[existing] == 0).all() and not result.mask[existing].any()
    if structure is None:
        for first in range(0, IN, block_size):
            pruned = ~result.mask[:, first : first + block_size]
            target = round(0.5 * pruned.numel())
            assert pruned.sum().item() == max(target, existing[:, first : first + block_size].sum())
    plain = sparsegpt_prune(weight, hessian, 0.5, structure, block_size)
    assert (plain.weight[existing] != 0).any()  # without it, later updates revive some zeros


def test_preserved_mask_refuses_a_weight_already_sparser_than_asked() -> None:
    weight, x = layer(4)
    weight[:, : IN // 2] = 0
    with pytest.raises(ValueError, match="already 0.5 sparse, more than sparsity=0.3"):
        sparsegpt_prune(weight, hessian_of(x), 0.3, preserve_mask=True)


@pytest.mark.parametrize("structure", [None, (2, 4)])
def test_output_error_below_magnitude_pruning_on_correlated_inputs(
    structure: tuple[int, int] | None,
) -> None:
    weight, x = layer(4, torch.float32)
    result = sparsegpt_prune(weight, hessian_of(x), 0.5, structure)
    magnitude = nm_mask(weight.abs(), 2, 4) if structure else unstructured_mask(weight.abs(), 0.5)
    sparsegpt_error = ((weight - result.weight) @ x.T).norm()
    magnitude_error = ((weight - weight * magnitude) @ x.T).norm()
    assert sparsegpt_error < 0.7 * magnitude_error
    assert result.weight.dtype == torch.float32


def test_dead_inputs_are_pruned_first_and_weight_is_left_untouched() -> None:
    weight, x = layer(5)
    x[:, [7, 30]] = 0
    hessian = hessian_of(x)
    before = weight.clone()
    result = sparsegpt_prune(weight, hessian, 0.5, block_size=IN)
    assert not result.mask[:, [7, 30]].any()
    assert torch.equal(weight, before)
    ref_weight, ref_mask, _ = ref_sparsegpt(weight, hessian, 0.5, None, IN)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_weight, rtol=1e-10, atol=1e-10)


def test_settings_that_do_not_fit_are_rejected() -> None:
    weight, x = layer()
    hessian = hessian_of(x)
    with pytest.raises(ValueError, match="pass sparsity=0.5"):
        sparsegpt_prune(weight, hessian, 0.7, (2, 4))
    with pytest.raises(ValueError, match="m dividing 64"):
        sparsegpt_prune(weight, hessian, 0.4, (3, 5))
    with pytest.raises(ValueError, match="sparsity="):
        sparsegpt_prune(weight, hessian, 1.5)

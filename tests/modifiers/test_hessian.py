"""Hessian accumulation, damped inversion and the blockwise OBS sweep, against direct formulas."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.core.gram_bands import GRAM_BAND, accumulator_bytes
from lightning_compress.modifiers.hessian import (
    BlockwiseOBS,
    HessianAccumulator,
    HessianWorkspace,
    SingularHessianError,
    _permute_in_place,
    all_finite,
    damp_and_factor,
)

IN = 24


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs of varied shapes, each with a padding mask (False drops a token)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 5), (3, 7), (1, 4), (4, 3)]
    return [
        (torch.randn(*shape, IN, generator=gen), torch.rand(*shape, generator=gen) > 0.3)
        for shape in shapes
    ]


def direct_hessian(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """``2/n X^T X`` in float64 over the kept tokens, computed in one go."""
    rows = torch.cat([x[mask] for x, mask in parts]).double()
    return 2 / rows.shape[0] * rows.T @ rows, rows.shape[0]


def accumulate(
    parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float64
) -> HessianAccumulator:
    acc = HessianAccumulator(IN, dtype=dtype)
    for x, mask in parts:
        acc.add(x, mask)
    return acc


def test_accumulation_equals_direct_formula() -> None:
    parts = batches()
    expected, n = direct_hessian(parts)
    exact = accumulate([(x.double(), mask) for x, mask in parts])
    assert exact.num_samples == n
    torch.testing.assert_close(exact.hessian(), expected, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float64, torch.float32):  # float32 inputs: float32 batch products
        acc = accumulate(parts, dtype)
        assert acc.hessian().dtype == dtype
        torch.testing.assert_close(acc.hessian().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hessian_in_a_dtype_is_each_upper_sum_entry_divided_then_rounded(
    dtype: torch.dtype,
) -> None:
    width = 3 * GRAM_BAND + 77  # three full bands and a short one
    gen = torch.Generator().manual_seed(5)
    acc = HessianAccumulator(width)
    for _ in range(2):
        acc.add(torch.randn(3, 50, width, generator=gen) * 10 ** torch.randn(width, generator=gen))
    total = acc.hessian(torch.float64, samples=1)  # the sum itself: divided by 1, exact
    expected = (total / acc.num_samples).to(dtype)
    hessian = acc.hessian(dtype)
    assert hessian.dtype == dtype
    assert torch.equal(hessian, expected)  # exact: one division and one rounding per entry


def test_wide_inputs_multiplied_in_bands_give_the_full_symmetric_hessian() -> None:
    width = 2 * GRAM_BAND + 77  # two full bands and a short one
    gen = torch.Generator().manual_seed(3)
    parts = [(torch.randn(2, 300, width, generator=gen), None), (torch.randn(64, width), None)]
    rows = torch.cat([x.reshape(-1, width) for x, _ in parts]).double()
    acc = HessianAccumulator(width)
    for x, _ in parts:
        acc.add(x)
    hessian = acc.hessian()
    assert torch.equal(hessian, hessian.T)
    torch.testing.assert_close(hessian, 2 / rows.shape[0] * rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_a_batch_adds_the_same_whatever_came_before() -> None:
    # Ranks see different histories; a batch's own contribution must not depend on them.
    (x, mask), (y, other) = batches()[:2]
    alone, after = HessianAccumulator(IN, torch.float64), accumulate([(x, mask)])
    alone.add(y, other)
    weighted_after, count_after = after.hessian(samples=1), after.num_samples
    after.add(y, other)
    weighted_both, count_both = after.hessian(samples=1), after.num_samples
    weighted_alone = alone.hessian(samples=1)
    assert count_both - count_after == int(other.sum())
    torch.testing.assert_close(
        weighted_both - weighted_after, weighted_alone, rtol=1e-12, atol=1e-12
    )


def test_no_mask_uses_every_token_and_empty_batches_are_ignored() -> None:
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    acc = HessianAccumulator(IN, dtype=torch.float64)
    acc.add(x)
    acc.add(x, torch.zeros(3, 4, dtype=torch.bool))
    rows = x.reshape(-1, IN)
    assert acc.num_samples == 12
    torch.testing.assert_close(acc.hessian(), 2 / 12 * rows.T @ rows, rtol=1e-12, atol=1e-12)


def test_float32_inputs_beyond_float32_sums_do_not_overflow() -> None:
    # Raw float32 sums of squares would reach ~6e39, beyond float32's 3.4e38: each batch's
    # mean (2.5e37) stays in float32 range and the sum is kept in float64.
    x = torch.full((4, 64, IN), 5e18)
    acc = HessianAccumulator(IN)
    for batch in x:
        acc.add(batch)
    assert torch.isfinite(acc.hessian()).all()
    expected = torch.full((IN, IN), 5e37, dtype=torch.float64)
    torch.testing.assert_close(acc.hessian(), expected, rtol=1e-5, atol=0)


def test_split_merge_equals_whole() -> None:
    parts = batches()
    whole = accumulate(parts)
    left, right = accumulate(parts[:2]), accumulate(parts[2:])
    left.merge(right)
    assert left.num_samples == whole.num_samples
    torch.testing.assert_close(left.hessian(), whole.hessian(), rtol=1e-12, atol=1e-12)


def test_a_count_given_divides_the_sum_instead() -> None:
    acc = accumulate(batches(1))
    total = acc.hessian(samples=1)
    assert torch.equal(acc.hessian(samples=7), total / 7)
    assert torch.equal(acc.hessian(torch.float32, samples=7), (total / 7).float())
    assert torch.equal(acc.hessian(samples=0), torch.zeros(IN, IN, dtype=torch.float64))


def test_a_workspace_holds_each_hessian_in_memory_grown_to_the_largest() -> None:
    narrow, wide = accumulate(batches(1)), HessianAccumulator(2 * IN)
    wide.add(torch.randn(5, 2 * IN))
    workspace = HessianWorkspace()
    first = narrow.hessian(torch.float32, workspace=workspace)
    assert torch.equal(first, narrow.hessian(torch.float32))
    again = narrow.hessian(torch.float32, workspace=workspace)
    assert again.data_ptr() == first.data_ptr()  # the same memory, made again
    grown = wide.hessian(torch.float32, workspace=workspace)
    assert torch.equal(grown, wide.hessian(torch.float32))
    assert narrow.hessian(torch.float32, workspace=workspace).data_ptr() == grown.data_ptr()
    other = narrow.hessian(torch.float64, workspace=workspace)  # another dtype: remade
    assert other.dtype == torch.float64 and torch.equal(other, narrow.hessian())
    workspace.release()
    assert workspace._buffer is None


def test_offloading_keeps_accumulating() -> None:
    parts = batches()
    acc = accumulate(parts[:2]).to("cpu")
    for x, mask in parts[2:]:
        acc.add(x, mask)
    torch.testing.assert_close(acc.hessian(), accumulate(parts).hessian())


def test_band_buffers_follow_the_input_dtype_and_a_loaded_state() -> None:
    width = GRAM_BAND * 2 + 5
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(40, width, generator=gen, dtype=torch.float64) for _ in range(4)]
    acc = HessianAccumulator(width)
    acc.add(parts[0].float())  # float32 rows: products converted into the float64 sum
    acc.add(parts[1])  # float64 rows: straight into the sum
    acc.add(parts[2].float())
    acc.to("cpu").add(parts[3])
    rows = torch.cat(parts)
    expected = 2 / rows.shape[0] * rows.T @ rows
    torch.testing.assert_close(acc.hessian(), expected, rtol=1e-5, atol=1e-6)


def held_bytes(acc: HessianAccumulator) -> int:
    """The bytes of every distinct storage an accumulator's tensors use."""
    tensors = [*acc._upper] + [t for band in acc._bands for t in band[3:5] if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("width", [32, GRAM_BAND * 2, GRAM_BAND * 3 + 5])
@pytest.mark.parametrize("rows", [torch.float32, torch.float64])
def test_memory_bytes_are_what_an_accumulator_holds(width: int, rows: torch.dtype) -> None:
    for dtype in (torch.float32, torch.float64):
        acc = HessianAccumulator(width, dtype)
        acc.add(torch.randn(3, width, dtype=rows))
        assert held_bytes(acc) == accumulator_bytes(width, dtype, rows)


def test_wide_accumulators_hold_about_half_the_square() -> None:
    for width in (4096, 8192):  # the triangle, and one band's buffers
        assert 0.5 < accumulator_bytes(width) / (8 * width**2) < 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_nan_and_infinities_anywhere(dtype: torch.dtype, bad: float) -> None:
    values = torch.randn(37, 41, dtype=dtype).triu()  # vector lanes, their tail, zeros
    assert all_finite(values) and all_finite(values[:0])
    for index in [(0, 0), (3, 4), (6, 8), (20, 17), (36, 39), (36, 40)]:
        broken = values.clone()
        broken[index] = bad
        assert not all_finite(broken)


def test_shape_errors_say_what_was_expected() -> None:
    acc = HessianAccumulator(IN)
    with pytest.raises(ValueError, match="last dimension"):
        acc.add(torch.randn(2, IN + 1))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        acc.add(torch.randn(2, 3, IN), torch.ones(2, 4))
    with pytest.raises(ValueError, match="in_features"):
        acc.merge(HessianAccumulator(IN + 1))


# --- damp_and_factor ---


def spd(n: int = 8, seed: int = 0) -> torch.Tensor:
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / (4 * n)


@pytest.mark.parametrize("size", [8, 301])
def test_factor_is_the_upper_triangular_root_of_the_damped_hessian(size: int) -> None:
    """``R R^T = H + lambda I`` with ``R`` upper: ``R^-1`` is the upper Cholesky factor of the
    inverse that GPTQ's paper sweeps with."""
    h = spd(size)
    factor = damp_and_factor(h, 0.05)
    damped = h + 0.05 * h.diagonal().mean() * torch.eye(size, dtype=h.dtype)
    assert torch.equal(factor.upper, factor.upper.triu())
    assert (factor.upper.diagonal() > 0).all()  # the Cholesky factor, not another root
    torch.testing.assert_close(factor.upper @ factor.upper.T, damped)
    inverse_factor = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(torch.linalg.inv(factor.upper), inverse_factor)
    assert factor.dampening_frac == 0.05
    assert not factor.dead.any()


def test_dead_inputs_are_reported_and_made_invertible() -> None:
    h = spd()
    h[[2, 5], :] = 0
    h[:, [2, 5]] = 0
    before = h.clone()
    factor = damp_and_factor(h, 0.01)
    assert factor.dead.nonzero().flatten().tolist() == [2, 5]
    assert torch.isfinite(factor.upper).all()
    assert torch.equal(h, before)  # the caller's Hessian is untouched


def test_order_factors_the_hessian_of_the_inputs_taken_in_that_order() -> None:
    h = spd(301)
    h[[2, 5], :] = 0
    h[:, [2, 5]] = 0
    order = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(1))
    before = h.clone()
    expected = damp_and_factor(h[order][:, order], 0.01)
    ordered = damp_and_factor(h, 0.01, order=order)
    assert torch.equal(h, before)  # the caller's Hessian is untouched
    overwritten = damp_and_factor(h, 0.01, overwrite=True, order=order)
    for factor in (ordered, overwritten):  # exact: the same numbers, only moved
        assert torch.equal(factor.upper, expected.upper)
        assert torch.equal(factor.dead, expected.dead)
    assert sorted(order[overwritten.dead].tolist()) == [2, 5]


@pytest.mark.parametrize(
    "order",
    [
        torch.arange(300),  # nothing moves
        torch.randperm(300, generator=torch.Generator().manual_seed(2)),
        torch.cat([torch.arange(1, 300), torch.zeros(1, dtype=torch.long)]),  # one cycle
        torch.arange(300).flip(0),  # pairs, and one input in place
    ],
)
def test_a_hessian_permuted_in_place_is_the_gathered_one(order: torch.Tensor) -> None:
    matrix = torch.randn(300, 300, generator=torch.Generator().manual_seed(3))  # 2 strips
    expected = matrix[order][:, order]
    _permute_in_place(matrix, order.tolist())
    assert torch.equal(matrix, expected)


@pytest.mark.parametrize("order", [torch.arange(7), torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])])
def test_order_that_is_no_permutation_of_the_inputs_is_refused(order: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected a permutation of the 8 inputs"):
        damp_and_factor(spd(), 0.01, order=order)


def indefinite() -> torch.Tensor:
    """Eigenvalues 11 and -9, mean diagonal 1: positive definite only once lambda > 9."""
    return torch.tensor([[1.0, 10.0], [10.0, 1.0]])


def test_retries_with_ten_times_more_dampening() -> None:
    factor = damp_and_factor(indefinite(), 0.01, max_retries=3)
    assert factor.dampening_frac == pytest.approx(10.0)


def test_gives_up_with_a_message_that_says_what_to_do() -> None:
    with pytest.raises(SingularHessianError, match="raise dampening_frac") as info:
        damp_and_factor(indefinite(), 0.01, max_retries=2)
    assert "0.01, 0.1, 1.0" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SingularHessianError, match=r"\[0.0\]"):
        damp_and_factor(indefinite(), 0.0)
    with pytest.raises(SingularHessianError, match="NaN or inf"):
        damp_and_factor(torch.full((2, 2), float("nan")), 0.01)


# --- the blockwise sweep ---


def half_grid(j: int, w: torch.Tensor, sweep: BlockwiseOBS) -> torch.Tensor:
    """A deterministic stand-in for quantization: round to multiples of 0.5."""
    return (w * 2).round() / 2


@pytest.mark.parametrize("block_size", [1, 5, 8, 64])
def test_sweep_is_independent_of_block_size_and_its_loss_is_the_output_error(
    block_size: int,
) -> None:
    gen = torch.Generator().manual_seed(3)
    h = spd(16, seed=3)
    weight = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    result, loss = BlockwiseOBS(weight, h, block_size, 0.01).run(half_grid)
    reference, _ = BlockwiseOBS(weight, h, 16, 0.01).run(half_grid)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=h.dtype)
    delta = weight - result
    assert loss == pytest.approx(0.5 * torch.trace(delta @ damped @ delta.T).item(), rel=1e-9)


def test_a_target_that_overwrites_its_buffer_gives_what_a_new_tensor_gives() -> None:
    """The sweep hands each target a buffer it may compress in place (as GPTQ's quantizer
    does); a target returning a new tensor (copied back) gives the same sweep."""
    gen = torch.Generator().manual_seed(8)
    h = spd(40, seed=8)
    weight = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    buffers = []

    def in_place(j: int, w: torch.Tensor, sweep: BlockwiseOBS) -> torch.Tensor:
        buffers.append(w.data_ptr())
        return w.mul_(2).round_().div_(2)

    reference, loss = BlockwiseOBS(weight, h, 16, 0.01).run(half_grid)
    result, in_place_loss = BlockwiseOBS(weight, h, 16, 0.01).run(in_place)
    assert torch.equal(result, reference) and in_place_loss == loss
    assert not torch.equal(result, weight)
    assert len(set(buffers)) == 16  # one row of the block's buffer per column, reused


def test_a_sweep_in_an_order_is_the_sweep_of_the_reordered_weight_and_hessian() -> None:
    gen = torch.Generator().manual_seed(4)
    h = spd(16, seed=4)
    h[3, :] = 0
    h[:, 3] = 0
    weight = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    order = torch.randperm(16, generator=gen)
    before = h.clone()
    reordered = BlockwiseOBS(weight[:, order], h[order][:, order], 8, 0.01)
    reference, loss = reordered.run(half_grid)
    sweep = BlockwiseOBS(weight, h, 8, 0.01, order=order)
    assert torch.equal(h, before)  # not consumed: left as it was
    assert torch.equal(sweep.dead, reordered.dead)
    result, ordered_loss = sweep.run(half_grid)
    consumed = BlockwiseOBS(weight, h, 8, 0.01, consume_hessian=True, order=order)
    for other, other_loss in (consumed.run(half_grid), (result, ordered_loss)):
        assert torch.equal(other, reference)  # exact: the same numbers, only moved
        assert other_loss == loss


def test_current_columns_are_current_transposed_at_every_point_of_the_sweep() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    checked = []

    def check(j: int, w: torch.Tensor, sweep: BlockwiseOBS) -> torch.Tensor:
        for stop in (j + 1, j + 7, j + 30):  # within the sub-block, the block and beyond
            expected = sweep.current(j, stop)
            assert torch.equal(sweep.current_columns(j, stop), expected.T)
        checked.append(j)
        return half_grid(j, w, sweep)

    BlockwiseOBS(weight, spd(40, seed=5), block_size=24).run(check)
    assert checked == list(range(40))


def forward_sweep(
    weight: torch.Tensor, h: torch.Tensor, target, ahead: int
) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """GPTQ's paper, one column at a time: the full inverse, each error spread forward.

    Returns the result, the values of columns ``[j, j + ahead)`` before column ``j`` is
    compressed, and the loss ``sum((w - q)^2 / [H^-1]_jj) / 2`` of the remaining inverses.
    """
    damped = h.clone()
    damped.diagonal()[damped.diagonal() == 0] = 1
    damped += 0.01 * damped.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w, seen, loss = weight.clone(), [], 0.0
    for j in range(w.shape[1]):
        seen.append(w[:, j : j + ahead].clone())
        inverse = torch.linalg.inv(damped[j:, j:])  # H^-1 of the columns not yet visited
        q = target(j, w[:, j], None)
        error = (w[:, j] - q) / inverse[0, 0]
        loss += (error.square().sum() * inverse[0, 0] / 2).item()
        w[:, j:] -= error[:, None] * inverse[0]
        w[:, j] = q
    return w, seen, loss


@pytest.mark.parametrize("block_size", [1, 5, 16, 40, 64])
def test_the_sweep_and_what_it_shows_ahead_equal_the_column_loop_with_the_full_inverse(
    block_size: int,
) -> None:
    """Each column is compressed from, and :meth:`current` shows (within the sub-block, the
    block and beyond), the values the forward updates of GPTQ's paper give."""
    gen = torch.Generator().manual_seed(6)
    h = spd(40, seed=6)
    weight = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    expected, ahead, expected_loss = forward_sweep(weight, h, half_grid, 30)
    checked = []

    def check(j: int, w: torch.Tensor, sweep: BlockwiseOBS) -> torch.Tensor:
        torch.testing.assert_close(w, ahead[j][:, 0], rtol=1e-12, atol=1e-12)
        for stop in (j + 1, j + 7, j + 30):
            width = min(stop, 40) - j
            torch.testing.assert_close(
                sweep.current(j, stop), ahead[j][:, :width], rtol=1e-12, atol=1e-12
            )
        torch.testing.assert_close(sweep.current(j + 2, j + 9), ahead[j][:, 2:9])
        with pytest.raises(ValueError, match="before column"):
            sweep.current(j - 1, j + 1) if j else sweep.current(-1, 0)
        checked.append(j)
        return half_grid(j, w, sweep)

    result, loss = BlockwiseOBS(weight, h, block_size, 0.01).run(check)
    assert checked == list(range(40))
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-10)


def test_sweep_rejects_misfits() -> None:
    with pytest.raises(ValueError, match="transpose Conv1D"):
        BlockwiseOBS(torch.randn(4, 8), torch.eye(4))
    with pytest.raises(ValueError, match="block_size"):
        BlockwiseOBS(torch.randn(4, 8), torch.eye(8), block_size=0)

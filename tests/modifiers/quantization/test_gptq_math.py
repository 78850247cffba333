"""GPTQ against a slow, obviously correct reference: one column at a time, full inverse."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_compress.modifiers.hessian import SingularHessianError
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import (
    PRUNED_ZERO_FRACTION,
    gptq_quantize,
    normalize_actorder,
    weights_to_keep,
)
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import calculate_qparams, fake_quantize

OUT, IN, GROUP, DAMP = 16, 64, 16, 0.01

ARGS = {
    "tensor": QuantizationArgs(num_bits=4, strategy="tensor"),
    "channel": QuantizationArgs(num_bits=4, strategy="channel"),
    "group": QuantizationArgs(num_bits=4, strategy="group", group_size=GROUP),
    "fp8-channel": QuantizationArgs(type="float", strategy="channel"),
}


def layer(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs with strongly correlated features (rank 6 plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=gen) @ torch.randn(6, IN, generator=gen)
    x = x + 0.1 * torch.randn(256, IN, generator=gen)
    x = x * torch.rand(IN, generator=gen) * 3  # uneven diag(H), so act-order matters
    return torch.randn(OUT, IN, generator=gen).to(dtype), x.to(dtype)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def without_rounding_ties(
    weight: torch.Tensor, hessian: torch.Tensor, actorder: str | None
) -> torch.Tensor:
    """Shrinks the first column GPTQ visits in each group of ``GROUP`` columns.

    A symmetric scale puts the value that sets it exactly on a rounding tie (-7.5 steps).
    When that value sits in the group's first visited column, its last bit (which depends
    on the order of float sums) decides between -7 and -8, so the blocked sweep and the
    reference could both be right and still differ. Small first columns never set the scale.
    """
    order = torch.arange(IN)
    if actorder is not None:
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    weight = weight.clone()
    weight[:, order[::GROUP]] *= 0.1
    return weight


# --- the reference ---


def ref_qparams(x: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of ``x`` ``[out, k]``: one per row, or one for all (tensor)."""
    if args.strategy == "tensor":
        return calculate_qparams(x.min(), x.max(), args)
    return calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)


def ref_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    actorder: str | None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """GPTQ as the paper states it: each column quantized, its error spread with ``inv(H[j:, j:])``.

    Entries that ``keep`` marks False are quantized to zero.

    Returns ``(weight_q, scale, zero_point, g_idx, loss)``.
    """
    keep = torch.ones_like(weight, dtype=torch.bool) if keep is None else keep
    w, h = weight.double().clone(), hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * h.diagonal().mean() * torch.eye(IN, dtype=h.dtype)
    reordered = actorder in ("weight", "group")
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if reordered else None
    if perm is None:
        perm = torch.arange(IN)
    column_args = dataclasses.replace(args, strategy="channel", group_size=None)
    grouped = args.strategy == "group"
    if grouped:  # natural groups, qparams fixed up front (used by actorder="weight" only)
        fixed = [ref_qparams(w[:, g : g + GROUP], column_args) for g in range(0, IN, GROUP)]
    else:
        fixed = [ref_qparams(w, args)]
    w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    on_entry, loss = [], 0.0
    for j in range(IN):
        if grouped and actorder != "weight" and j % GROUP == 0:
            on_entry.append(ref_qparams(w[:, j : j + GROUP], column_args))
        if grouped:
            scale, zero_point = fixed[perm[j] // GROUP] if actorder == "weight" else on_entry[-1]
        else:
            scale, zero_point = fixed[0]
        hinv = torch.linalg.inv(h[j:, j:])
        q = fake_quantize(w[:, j : j + 1], scale, zero_point, column_args)[:, 0] * keep[:, j]
        loss += ((w[:, j] - q).square().sum() / hinv[0, 0] / 2).item()
        w[:, j:] -= ((w[:, j] - q) / hinv[0, 0])[:, None] * hinv[0]
        w[:, j] = q
    inverse = torch.argsort(perm)
    qparams = on_entry if grouped and actorder != "weight" else fixed
    scale = torch.cat([s for s, _ in qparams], dim=-1)
    zero_point = torch.cat([z for _, z in qparams], dim=-1)
    g_idx = None
    if grouped:
        g_idx = (inverse if actorder == "group" else torch.arange(IN)) // GROUP
    return w[:, inverse], scale, zero_point, g_idx, loss


# --- blocked result equals the reference ---

CASES = [
    (strategy, symmetric, actorder, block_size)
    for strategy in ARGS
    for symmetric in (True, False)
    for actorder in (None, "weight", "group")
    for block_size in (16, 24)  # 24: groups of 16 straddle block boundaries
    if (actorder != "group" or strategy == "group") and (symmetric or strategy != "fp8-channel")
]


@pytest.mark.parametrize(("strategy", "symmetric", "actorder", "block_size"), CASES)
def test_blocked_gptq_equals_column_loop_reference(
    strategy: str, symmetric: bool, actorder: str | None, block_size: int
) -> None:
    args = dataclasses.replace(ARGS[strategy], symmetric=symmetric)
    weight, x = layer()
    hessian = hessian_of(x)
    weight = without_rounding_ties(weight, hessian, actorder)
    result = gptq_quantize(weight, hessian, args, block_size, DAMP, actorder)
    ref_weight, ref_scale, ref_zero_point, ref_g_idx, ref_loss = ref_gptq(
        weight, hessian, args, actorder
    )
    torch.testing.assert_close(result.weight_q, ref_weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.scale, ref_scale, rtol=1e-10, atol=0)
    assert torch.equal(result.zero_point, ref_zero_point)
    assert result.scale.shape == ref_scale.shape
    if ref_g_idx is None:
        assert result.g_idx is None
    else:
        assert torch.equal(result.g_idx, ref_g_idx.to(torch.int32))
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert result.dampening_used == DAMP


@pytest.mark.parametrize("actorder", [None, "weight", "group"])
def test_pruned_weights_stay_zero_and_their_error_is_spread(actorder: str | None) -> None:
    weight, x = layer(4)
    hessian = hessian_of(x)
    weight = without_rounding_ties(weight, hessian, actorder)
    pruned = weight * (torch.rand(weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5)
    keep = weights_to_keep(pruned)
    result = gptq_quantize(pruned, hessian, ARGS["group"], 24, DAMP, actorder, keep)
    assert (result.weight_q[pruned == 0] == 0).all()
    assert (result.weight_q[pruned != 0] != 0).float().mean() > 0.8  # others mostly not
    ref_weight, _, _, _, ref_loss = ref_gptq(pruned, hessian, ARGS["group"], actorder, keep)
    torch.testing.assert_close(result.weight_q, ref_weight, rtol=1e-10, atol=1e-10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)


@pytest.mark.parametrize("actorder", [None, "weight"])
def test_a_dense_weights_accidental_zeros_are_quantized_like_any_weight(
    actorder: str | None,
) -> None:
    weight, x = layer(4)
    hessian = hessian_of(x)
    weight = without_rounding_ties(weight, hessian, actorder)
    rows, columns = torch.arange(OUT).repeat(2), torch.arange(2 * OUT) * 7 % IN
    weight[rows, columns] = 0  # 32 of 1024 weights (3%): no pruning mask
    assert weights_to_keep(weight) is None
    result = gptq_quantize(weight, hessian, ARGS["group"], 24, DAMP, actorder)
    assert (result.weight_q[rows, columns] != 0).any()  # the error feedback moves some
    ref_weight, _, _, _, ref_loss = ref_gptq(weight, hessian, ARGS["group"], actorder)
    torch.testing.assert_close(result.weight_q, ref_weight, rtol=1e-10, atol=1e-10)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)


def test_weights_to_keep_marks_the_zeros_of_pruned_layers_only() -> None:
    weight, _ = layer(5)
    few = weight.clone()
    few[0, :3] = 0  # 3 of 1024 zeros: accidental
    pruned = weight * (torch.arange(IN) % 4 < 2)  # 2:4, 50% zeros
    at_threshold = math.ceil(PRUNED_ZERO_FRACTION * weight.numel())
    threshold, below = weight.clone().reshape(-1), weight.clone().reshape(-1)
    threshold[:at_threshold], below[: at_threshold - 1] = 0, 0
    threshold, below = threshold.reshape(weight.shape), below.reshape(weight.shape)
    assert weights_to_keep(weight) is None and weights_to_keep(weight, True) is None
    assert weights_to_keep(few) is None and weights_to_keep(few, "auto") is None
    assert torch.equal(weights_to_keep(few, True), few != 0)
    assert torch.equal(weights_to_keep(pruned), pruned != 0)
    assert torch.equal(weights_to_keep(threshold), threshold != 0)
    assert weights_to_keep(below) is None
    assert weights_to_keep(pruned, False) is None
    with pytest.raises(ValueError, match="preserve_zeros='always' is invalid: expected True"):
        weights_to_keep(pruned, "always")
    with pytest.raises(ValueError, match="keep has shape"):
        gptq_quantize(pruned, hessian_of(layer(5)[1]), ARGS["group"], keep=pruned[:, :8] != 0)


@pytest.mark.parametrize(("strategy", "actorder"), [("channel", "weight"), ("group", "group")])
def test_weights_sharing_a_hessian_can_run_stacked(strategy: str, actorder: str) -> None:
    first, x = layer(5)
    second = torch.randn(8, IN, generator=torch.Generator().manual_seed(6), dtype=first.dtype)
    hessian = hessian_of(x)
    stacked = gptq_quantize(torch.cat([first, second]), hessian, ARGS[strategy], 24, DAMP, actorder)
    rows = [first.shape[0], second.shape[0]]
    for weight, part in zip((first, second), range(2), strict=True):
        alone = gptq_quantize(weight, hessian, ARGS[strategy], 24, DAMP, actorder)
        for got, expected in zip(stacked[:3], alone[:3], strict=True):
            torch.testing.assert_close(got.split(rows)[part], expected, rtol=1e-12, atol=1e-12)
        loss = stacked.row_losses.split(rows)[part].sum().item()
        assert loss == pytest.approx(alone.loss, rel=1e-9)
    assert stacked.loss == pytest.approx(stacked.row_losses.sum().item(), rel=1e-12)


def test_actorder_weight_group_scales_are_the_natural_groups_of_the_weight() -> None:
    weight, x = layer()
    result = gptq_quantize(weight, hessian_of(x), ARGS["group"], actorder="weight")
    scale, zero_point = qparams_for_weight(weight, ARGS["group"])
    assert torch.equal(result.scale, scale)
    assert torch.equal(result.zero_point, zero_point)


@pytest.mark.parametrize(("alias", "name"), [("static", "weight"), ("dynamic", "group")])
def test_compressed_tensors_aliases_coincide(alias: str, name: str) -> None:
    weight, x = layer()
    hessian = hessian_of(x)
    a = gptq_quantize(weight, hessian, ARGS["group"], actorder=alias)
    b = gptq_quantize(weight, hessian, ARGS["group"], actorder=name)
    assert torch.equal(a.weight_q, b.weight_q) and torch.equal(a.g_idx, b.g_idx)
    assert normalize_actorder("NONE") is None
    with pytest.raises(ValueError, match="actorder="):
        normalize_actorder("random")


def test_loss_is_half_the_damped_quadratic_form_of_the_change() -> None:
    weight, x = layer(1)
    hessian = hessian_of(x)
    result = gptq_quantize(weight, hessian, ARGS["group"], actorder="group")
    damped = hessian + DAMP * hessian.diagonal().mean() * torch.eye(IN, dtype=hessian.dtype)
    delta = weight - result.weight_q
    assert result.loss == pytest.approx(0.5 * torch.trace(delta @ damped @ delta.T).item())


# --- quality, dead inputs, dtypes, errors ---


@pytest.mark.parametrize("strategy", ["tensor", "channel", "group"])
@pytest.mark.parametrize("actorder", [None, "weight"])
def test_output_error_below_round_to_nearest_on_correlated_inputs(
    strategy: str, actorder: str | None
) -> None:
    args = ARGS[strategy]
    weight, x = layer(2, torch.float32)
    result = gptq_quantize(weight, hessian_of(x), args, actorder=actorder)
    rtn = fake_quantize(weight, *qparams_for_weight(weight, args), args)
    gptq_error = ((weight - result.weight_q) @ x.T).norm()
    rtn_error = ((weight - rtn) @ x.T).norm()
    assert gptq_error < 0.7 * rtn_error


def test_dead_inputs_get_zero_weights() -> None:
    weight, x = layer()
    x[:, [3, 40]] = 0
    hessian = hessian_of(x)
    weight = without_rounding_ties(weight, hessian, "group")
    result = gptq_quantize(weight, hessian, ARGS["group"], block_size=24, actorder="group")
    assert torch.isfinite(result.weight_q).all()
    assert (result.weight_q[:, [3, 40]] == 0).all()
    ref_weight, *_ = ref_gptq(weight, hessian, ARGS["group"], "group")
    torch.testing.assert_close(result.weight_q, ref_weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("actorder", [None, "group"])
def test_bfloat16_result_is_exactly_representable_with_its_qparams(actorder: str | None) -> None:
    weight, x = layer(3, torch.bfloat16)
    args = ARGS["group"]
    hessian = hessian_of(x.float())
    before = weight.clone()
    result = gptq_quantize(weight, hessian, args, actorder=actorder)
    assert result.weight_q.dtype == result.scale.dtype == torch.bfloat16
    assert torch.equal(weight, before)
    per_column = dataclasses.replace(args, group_size=1)  # one scale per element, via g_idx
    g = result.g_idx.long()
    again = fake_quantize(result.weight_q, result.scale[:, g], result.zero_point[:, g], per_column)
    assert torch.equal(again, result.weight_q)


def test_settings_gptq_cannot_handle_are_rejected() -> None:
    weight, x = layer()
    hessian = hessian_of(x)
    with pytest.raises(ValueError, match="needs strategy='group'"):
        gptq_quantize(weight, hessian, ARGS["channel"], actorder="group")
    with pytest.raises(ValueError, match="static weight qparams"):
        dynamic = QuantizationArgs(num_bits=4, strategy="group", group_size=16, dynamic=True)
        gptq_quantize(weight, hessian, dynamic)
    with pytest.raises(ValueError, match="does not divide in_features"):
        gptq_quantize(weight, hessian, dataclasses.replace(ARGS["group"], group_size=24))


def test_singular_hessian_raises_after_retries() -> None:
    weight = torch.randn(4, 2)
    hessian = torch.tensor([[1.0, 10.0], [10.0, 1.0]])  # indefinite: needs lambda > 9
    with pytest.raises(SingularHessianError, match="dampening_frac"):
        gptq_quantize(weight, hessian, ARGS["channel"], dampening_frac=0.001)
    assert gptq_quantize(weight, hessian, ARGS["channel"]).dampening_used == pytest.approx(10.0)


@pytest.mark.parametrize("actorder", [None, "static", "group"])
def test_a_consumed_hessian_gives_the_same_result_and_a_kept_one_stays_unchanged(
    actorder: str | None,
) -> None:
    weight, x = layer(7)
    hessian = hessian_of(x)
    before = hessian.clone()
    kept = gptq_quantize(weight, hessian, ARGS["group"], 8, actorder=actorder)
    assert torch.equal(hessian, before)
    consumed = gptq_quantize(
        weight, hessian.clone(), ARGS["group"], 8, actorder=actorder, consume_hessian=True
    )
    for field in ("weight_q", "scale", "zero_point", "row_losses"):  # exact: the same numbers
        assert torch.equal(getattr(consumed, field), getattr(kept, field))

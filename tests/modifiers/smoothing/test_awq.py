"""AWQModifier: the grid search of the paper, and a lower 4-bit error than round-to-nearest."""

from __future__ import annotations

import copy

import pytest
import torch
from modifiers.smoothing.models import (
    calibrate,
    inject_outliers,
    logits,
    tiny_decoder,
    token_batches,
)

from lightning_compress.core import CompressionSession
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.observers import qparams_for_weight
from lightning_compress.modifiers.quantization.ops import fake_quantize
from lightning_compress.modifiers.smoothing import AWQModifier, awq_search
from lightning_compress.recipe import RecipeError

W4_G16 = {"num_bits": 4, "strategy": "group", "group_size": 16}


def reference_loss(
    weights: list[torch.Tensor], x: torch.Tensor, scale: torch.Tensor, args: QuantizationArgs
) -> float:
    """The mean squared output error per token of ``Q(W diag(s)) diag(1/s)``, token by token."""
    total = 0.0
    for weight in weights:
        scaled = weight * scale
        quantized = fake_quantize(scaled, *qparams_for_weight(scaled, args), args)
        error = x @ weight.T - (x / scale) @ quantized.T
        total += float(error.square().sum()) / x.shape[0]
    return total


def reference_search(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    args: QuantizationArgs,
    n_grid: int,
    duo: bool | str,
) -> tuple[float | None, torch.Tensor]:
    """AWQ's search written out: explicit outputs on every token, one channel at a time;
    ``duo="both"``: ``n_grid // 2`` exponents, each without and with the weight magnitude."""
    tokens, width = x.shape
    act = torch.stack([x[:, j].abs().sum() / tokens for j in range(width)])
    stacked = torch.cat(weights)
    size = args.group_size
    magnitude = []
    for j in range(width):
        start = j // size * size
        column = [
            stacked[r, j].abs() / (stacked[r, start : start + size].abs().max() + 1e-6)
            for r in range(stacked.shape[0])
        ]
        magnitude.append(sum(column) / len(column))
    magnitude = torch.stack(magnitude)

    best = (None, torch.ones(width, dtype=x.dtype))
    best_loss = reference_loss(weights, x, best[1], args)
    steps = n_grid // 2 if duo == "both" else n_grid
    for step in range(steps):
        ratio = step / (steps - 1)
        for mode in [False, True] if duo == "both" else [duo]:
            scale = act**ratio / (magnitude ** (1 - ratio) + 1e-4) if mode else act**ratio
            scale = scale.clamp(min=1e-4)
            scale = scale / (scale.max() * scale.min()).sqrt()
            value = reference_loss(weights, x, scale, args)
            if value < best_loss:
                best, best_loss = (ratio, scale), value
    return best


@pytest.mark.parametrize("duo", [True, False, "both"])
def test_the_search_matches_a_reference_on_explicit_outputs(duo):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32, generator=generator, dtype=torch.float64)
    x[:, [2, 19]] *= 25  # salient channels
    weights = [torch.randn(rows, 32, generator=generator, dtype=torch.float64) for rows in (8, 4)]
    args = QuantizationArgs(**W4_G16)
    accumulator = HessianAccumulator(32, torch.float64)
    accumulator.add(x)
    act = x.abs().mean(dim=0)
    result = awq_search(weights, [accumulator.hessian()] * 2, act, args, n_grid=10, duo_scaling=duo)
    ratio, scale = reference_search(weights, x, args, n_grid=10, duo=duo)
    assert ratio is not None and result.ratio == pytest.approx(ratio)
    torch.testing.assert_close(result.scale, scale, rtol=1e-9, atol=0)
    # A scale one ulp away may flip a 4-bit code, so the loss is checked on the chosen scale's
    # own codes: the Hessian form equals the explicit outputs' error, whatever the kernels round.
    assert result.loss == pytest.approx(reference_loss(weights, x, result.scale, args), rel=1e-9)
    unscaled = torch.ones(32, dtype=torch.float64)
    assert result.unscaled_loss == pytest.approx(
        reference_loss(weights, x, unscaled, args), rel=1e-9
    )
    assert result.loss < 0.9 * result.unscaled_loss
    if duo == "both":  # the better of the two searches, which one depends on the data
        alone = [awq_search(weights, [accumulator.hessian()] * 2, act, args, 5, d) for d in (0, 1)]
        assert result.loss == min(other.loss for other in alone)
        assert result.duo_scaling == (alone[1].loss < alone[0].loss)


def test_awq_lowers_the_4bit_error_of_round_to_nearest():
    model = tiny_decoder()
    inject_outliers(model)
    reference = copy.deepcopy(model)
    plain, searched = copy.deepcopy(model), copy.deepcopy(model)
    groups = {"g": {"targets": ["Linear"], "weights": W4_G16}}
    rtn = {"config_groups": groups, "ignore": ["lm_head"]}
    calibrate(plain, [QuantizationModifier(**rtn)])
    (awq, _) = calibrate(
        searched, [AWQModifier(weights=W4_G16, ignore=["lm_head"]), QuantizationModifier(**rtn)]
    )
    assert len(awq.results) == 6
    assert all(result.loss <= result.unscaled_loss for result in awq.results.values())
    ids = token_batches(2, seed=9)[1]

    def error(model: torch.nn.Module) -> float:
        return (logits(model, ids) - logits(reference, ids)).square().mean().item()

    assert error(searched) < 0.5 * error(plain)


def test_awq_without_a_scheme_searches_with_the_schemes_of_its_stage():
    model = tiny_decoder()
    inject_outliers(model)
    symmetric = {**W4_G16, "symmetric": True}
    groups = {"g": {"targets": ["Linear"], "weights": symmetric}}
    rtn = {"config_groups": groups, "ignore": ["lm_head"]}
    borrowed, _ = calibrate(
        copy.deepcopy(model), [AWQModifier(ignore=["lm_head"]), QuantizationModifier(**rtn)]
    )
    explicit = AWQModifier(weights=symmetric, ignore=["lm_head"])
    own, _ = calibrate(copy.deepcopy(model), [explicit, QuantizationModifier(**rtn)])
    other = AWQModifier(weights={**W4_G16, "symmetric": False}, ignore=["lm_head"])
    asymmetric, _ = calibrate(copy.deepcopy(model), [other, QuantizationModifier(**rtn)])
    assert list(borrowed.results) == list(own.results)
    for name, result in borrowed.results.items():
        assert result.ratio == own.results[name].ratio
        assert torch.equal(result.scale, own.results[name].scale)
    assert any(
        result.loss != asymmetric.results[name].loss for name, result in borrowed.results.items()
    )


def test_the_default_scheme_is_asymmetric_int4_in_groups_of_128():
    args = AWQModifier()._weight_args
    assert args == QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"n_grid": 0}, r"AWQModifier.n_grid: expected an int >= 1"),
        ({"scheme": "W9"}, r"AWQModifier.scheme: unknown preset scheme 'W9'"),
        ({"weights": {"bits": 2}}, r"AWQModifier.weights: unknown key\(s\) \['bits'\]"),
        (
            {"weights": {"num_bits": 8, "strategy": "token", "dynamic": True}},
            r"AWQModifier.weights: expected static weight arguments",
        ),
        ({"start": 1}, r"AWQModifier.start: expected -1"),
    ],
)
def test_bad_settings_are_refused(settings, error):
    with pytest.raises(RecipeError, match=error):
        AWQModifier(**settings)


def test_a_group_size_that_does_not_fit_names_the_layers_before_calibration():
    weights = {"num_bits": 4, "strategy": "group", "group_size": 48}
    session = CompressionSession()
    error = r"weights: group_size 48 does not divide the input channels of \['model.layers.0"
    with pytest.raises(RecipeError, match=error):
        session.initialize(recipe=[AWQModifier(weights=weights)], model=tiny_decoder())


def test_without_calibration_data_it_is_a_recipe_error():
    session = CompressionSession()
    session.initialize(recipe=[AWQModifier(weights=W4_G16)], model=tiny_decoder())
    with pytest.raises(RecipeError, match="AWQModifier needs calibration data, but"):
        session.finalize()

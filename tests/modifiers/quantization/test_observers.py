"""Observers, checked against per-channel Python loops."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.modifiers.quantization.args import OBSERVER_NAMES, QuantizationArgs
from lightning_compress.modifiers.quantization.observers import (
    MemorylessMinMaxObserver,
    MemorylessMSEObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    observer_for,
    qparams_for_weight,
)
from lightning_compress.modifiers.quantization.ops import calculate_qparams, fake_quantize

CHANNEL_INT4 = QuantizationArgs(num_bits=4, strategy="channel")


def row_ranges(x: torch.Tensor) -> list[tuple[float, float]]:
    return [(min(row), max(row)) for row in x.tolist()]


def heavy_tailed(rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.distributions.StudentT(2.0).sample((rows, cols))


def test_minmax_keeps_running_extremes() -> None:
    first, second = torch.randn(3, 8), torch.randn(3, 8) * 2
    observer = MinMaxObserver(CHANNEL_INT4)
    observer.update(first)
    scale, zero_point = observer(second)

    expected = [
        (min(a_lo, b_lo), max(a_hi, b_hi))
        for (a_lo, a_hi), (b_lo, b_hi) in zip(row_ranges(first), row_ranges(second), strict=True)
    ]
    assert observer.min_vals.flatten().tolist() == [lo for lo, _ in expected]
    assert observer.max_vals.flatten().tolist() == [hi for _, hi in expected]
    ref_scale, ref_zero_point = calculate_qparams(
        observer.min_vals, observer.max_vals, CHANNEL_INT4
    )
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)
    assert scale.shape == (3, 1)


def test_moving_average_takes_first_batch_then_averages() -> None:
    args = QuantizationArgs(
        num_bits=8, symmetric=False, strategy="channel", averaging_constant=0.25
    )
    first, second = torch.randn(3, 8), torch.randn(3, 8) * 2
    observer = MovingAverageMinMaxObserver(args)
    observer.update(first)
    assert observer.min_vals.flatten().tolist() == [lo for lo, _ in row_ranges(first)]

    observer.update(second)
    for (a_lo, a_hi), (b_lo, b_hi), lo, hi in zip(
        row_ranges(first),
        row_ranges(second),
        observer.min_vals.flatten().tolist(),
        observer.max_vals.flatten().tolist(),
        strict=True,
    ):
        assert lo == pytest.approx(a_lo + 0.25 * (b_lo - a_lo), rel=1e-6)
        assert hi == pytest.approx(a_hi + 0.25 * (b_hi - a_hi), rel=1e-6)


def test_mse_error_not_above_minmax_on_heavy_tailed_data() -> None:
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=32)
    x = heavy_tailed(16, 64)
    errors = {}
    for name, observer in (("minmax", MinMaxObserver(args)), ("mse", MSEObserver(args))):
        scale, zero_point = observer(x)
        error = (fake_quantize(x, scale, zero_point, args) - x).abs().pow(2.4)
        errors[name] = error.reshape(16, 2, 32).sum(-1)

    assert (errors["mse"] <= errors["minmax"]).all()
    assert errors["mse"].sum() < errors["minmax"].sum()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_picks_the_best_shrink_of_each_channel(symmetric: bool) -> None:
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="channel")
    x = heavy_tailed(4, 32)
    grid = torch.linspace(1.0, 0.2, 20).tolist()
    observer = MSEObserver(args, grid=20, norm=2.0)
    observer.update(x)

    shrunk = []
    for row, (lo, hi), got_lo, got_hi in zip(
        x,
        row_ranges(x),
        observer.min_vals.flatten().tolist(),
        observer.max_vals.flatten().tolist(),
        strict=True,
    ):
        row_errors_by_shrink = []
        for shrink in grid:
            scale, zero_point = calculate_qparams(
                torch.tensor(lo) * shrink, torch.tensor(hi) * shrink, args
            )
            error = (fake_quantize(row, scale, zero_point, args) - row).pow(2).sum().item()
            row_errors_by_shrink.append(error)
        best = grid[row_errors_by_shrink.index(min(row_errors_by_shrink))]
        shrunk.append(best < 1)
        assert got_lo == pytest.approx(lo * best, rel=1e-5)
        assert got_hi == pytest.approx(hi * best, rel=1e-5)
    assert any(shrunk)


def test_mse_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="grid=0"):
        MSEObserver(CHANNEL_INT4, grid=0)
    with pytest.raises(ValueError, match="min_shrink=0"):
        MSEObserver(CHANNEL_INT4, min_shrink=0)


def test_observer_state_errors_and_reset() -> None:
    observer = MinMaxObserver(CHANNEL_INT4)
    with pytest.raises(RuntimeError, match="observed nothing"):
        observer.get_qparams()
    observer.update(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"qparams of shape \(4, 1\).*\(3, 1\).*reset"):
        observer.update(torch.randn(4, 8))
    observer.reset()
    observer.update(torch.randn(4, 8))
    assert observer.get_qparams()[0].shape == (4, 1)


def test_observers_track_no_gradient() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    scale, zero_point = MSEObserver(CHANNEL_INT4, grid=5)(x)
    assert not scale.requires_grad and not zero_point.requires_grad


@pytest.mark.parametrize(
    ("name", "observer_class"),
    [
        ("minmax", MinMaxObserver),
        ("moving_average", MovingAverageMinMaxObserver),
        ("mse", MSEObserver),
    ],
)
def test_observer_for_picks_by_name(name: str, observer_class: type) -> None:
    observer = observer_for(QuantizationArgs(observer=name))
    assert type(observer) is observer_class


def test_observer_for_covers_every_name_and_rejects_unknown() -> None:
    assert {type(observer_for(QuantizationArgs(observer=n))) for n in OBSERVER_NAMES} == {
        MinMaxObserver,
        MemorylessMinMaxObserver,
        MovingAverageMinMaxObserver,
        MSEObserver,
        MemorylessMSEObserver,
    }
    args = QuantizationArgs()
    object.__setattr__(args, "observer", "histogram")  # bypass validation on purpose
    with pytest.raises(ValueError, match=r"'histogram'.*moving_average"):
        observer_for(args)


def test_qparams_for_weight_uses_args_observer() -> None:
    args = QuantizationArgs(num_bits=4, strategy="channel", observer="mse")
    x = heavy_tailed(4, 32)
    scale, zero_point = qparams_for_weight(x, args)
    expected_scale, expected_zero_point = MSEObserver(args)(x)
    assert torch.equal(scale, expected_scale) and torch.equal(zero_point, expected_zero_point)

    given = MinMaxObserver(args)
    assert torch.equal(qparams_for_weight(x, args, given)[0], given.get_qparams()[0])

"""One-shot stage then training under DDP (2 CPU processes, ddp_fork, gloo)."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer
from oneshot_then_train_runs import (
    CountingCompressor,
    SaveRankState,
    gptq_then_qat,
    tiny_module,
    token_loader,
)

pytestmark = pytest.mark.distributed


def fit(directory, batch_size: int, order=None, **kwargs) -> list[dict]:
    """GPTQ on each rank's first 2 batches, then 3 QAT steps; returns every rank's report."""
    directory.mkdir()
    # Without activation ordering: its column order follows the Hessian's diagonal, which
    # near-ties let float rounding reorder.
    compressor = CountingCompressor(gptq_then_qat(actorder="none"), num_calibration_batches=2)
    run = quiet_trainer(max_steps=3, callbacks=[compressor, SaveRankState(directory)], **kwargs)
    run.fit(tiny_module(lr=0.5), token_loader(batch_size=batch_size, order=order))
    reports = sorted(directory.glob("rank*.pt"))
    return [torch.load(path, weights_only=True) for path in reports]


def test_ddp_ranks_calibrate_on_their_shards_once_reduce_to_one_process_and_end_alike(tmp_path):
    # Lightning's DistributedSampler shuffles (seed 0) and deals the windows out in turn: each
    # rank reads half of every batch of one process reading them in that order, so both
    # calibrate GPTQ on the same 16 windows (the ranks reducing their Hessians) and train on
    # the same batches.
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    (single,) = fit(tmp_path / "single", batch_size=8, order=order)
    ranks = fit(tmp_path / "ddp", batch_size=4, devices=2, strategy="ddp_fork")

    assert single["one_shot_steps"] == [0]
    assert [report["one_shot_steps"] for report in ranks] == [[0], [0]]
    first, second = ranks
    assert first["state"].keys() == second["state"].keys() == single["state"].keys()
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    # The first layers, which read the embeddings, are quantized from the Hessian of all 16
    # windows as one process has it, though each rank read 8: the ranks reduced their sums.
    # Summed in another order, the Hessian differs in the last bits, which can make GPTQ round
    # a weight to the neighbouring grid point (a few, found on an AMD EPYC); a rank that
    # used its own 8 windows would differ far more. (Later layers read the outputs of
    # quantized ones, where such flips propagate; so the trained weights are compared between
    # the ranks only.)
    for layer in ("q_proj", "k_proj", "v_proj"):
        prefix = f"model.model.layers.0.self_attn.{layer}."
        scale = single["first"][prefix + "weight_scale"]
        got_scale = first["first"][prefix + "weight_scale"]
        torch.testing.assert_close(got_scale, scale, rtol=1e-5, atol=0)
        assert_alike_but_for_a_few_grid_points(
            first["first"][prefix + "weight"], single["first"][prefix + "weight"], scale
        )


def assert_alike_but_for_a_few_grid_points(weight, expected, scale) -> None:
    """``weight`` equals ``expected`` up to float rounding, but for at most 2% of its values
    rounded to the neighbouring point of their group's grid (``scale`` ``[out, groups]``)."""
    step = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
    difference = (weight - expected).abs()
    close = difference <= 1e-5 * expected.abs() + 1e-7
    neighbour = (difference - step).abs() <= 1e-5 * step
    assert (close | neighbour).all()
    assert neighbour.float().mean() <= 0.02, neighbour.float().mean()

"""Reduction helpers outside torch.distributed, and the ones that move large statistics and
results on 3 forked ranks (the DDP calibration test runs the others on 2 ranks)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist
from forked_ranks import run_ranks

from lightning_compress.core import distributed
from lightning_compress.core.distributed import (
    ShardSampler,
    all_reduce_max_,
    all_reduce_min_,
    all_reduce_sum_,
    broadcast_,
    broadcast_tensors_,
    check_same_on_all_ranks,
    is_distributed,
)
from lightning_compress.modifiers.hessian import HessianAccumulator


def test_helpers_are_no_ops_in_one_process():
    tensor = torch.tensor([1.0, -2.0])
    assert not is_distributed()
    for helper in (all_reduce_sum_, all_reduce_min_, all_reduce_max_, broadcast_):
        assert helper(tensor) is tensor
    assert tensor.tolist() == [1.0, -2.0]
    check_same_on_all_ranks(3, "blocks")
    broadcast_tensors_([tensor], src=0)
    accumulator = HessianAccumulator(2)
    accumulator.add(tensor[None])
    accumulator.reduce_over_ranks_()
    assert accumulator.num_samples == 1
    assert list(ShardSampler(5)) == [0, 1, 2, 3, 4] and len(ShardSampler(5)) == 5


def reduce_and_broadcast_on_a_rank(directory: Path) -> None:
    """Sums a Hessian's upper-triangle bands in place, and broadcasts tensors large and
    small, contiguous or not, of several dtypes from rank 1."""
    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        accumulator = HessianAccumulator(400)  # bands of the upper triangle
        accumulator.add(rank_inputs(rank))
        accumulator.reduce_over_ranks_()
        tensors = sent_tensors(rank)
        with patch.object(distributed, "DIRECT_BYTES", 64):  # the large ones in place
            broadcast_tensors_(tensors, src=1)
        torch.save(
            {"hessian": accumulator.hessian(), "tokens": accumulator.num_samples}
            | {f"tensor{i}": tensor for i, tensor in enumerate(tensors)},
            directory / f"{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def rank_inputs(rank: int) -> torch.Tensor:
    return torch.randn(5 + rank, 400, generator=torch.Generator().manual_seed(rank))


def sent_tensors(rank: int) -> list[torch.Tensor]:
    """What rank 1 sends (the others hold zeros of the same shapes and dtypes)."""
    generator = torch.Generator().manual_seed(7)
    tensors = [
        torch.randn(10, 12, generator=generator),  # large: in place
        torch.randn(12, 10, generator=generator).T,  # large, not contiguous: through a copy
        torch.randn(3, generator=generator).to(torch.float8_e4m3fn),  # small: packed
        torch.tensor([True, False, True]),
        torch.randint(-8, 8, (40,), generator=generator, dtype=torch.int8),  # large int8
    ]
    return tensors if rank == 1 else [torch.zeros_like(tensor) for tensor in tensors]


@pytest.mark.distributed
def test_hessians_are_summed_in_bands_and_tensors_broadcast_bit_for_bit(tmp_path):
    run_ranks(reduce_and_broadcast_on_a_rank, tmp_path, ranks=3, timeout=120)
    whole = HessianAccumulator(400)
    for rank in range(3):
        whole.add(rank_inputs(rank))
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(3)]
    for result in results:
        assert result["tokens"] == whole.num_samples == 18
        torch.testing.assert_close(result["hessian"], whole.hessian(), rtol=1e-12, atol=1e-12)
        assert torch.equal(result["hessian"], results[0]["hessian"])  # the same on every rank
        for index, sent in enumerate(sent_tensors(1)):
            received = result[f"tensor{index}"]
            assert received.dtype == sent.dtype
            assert torch.equal(
                received.contiguous().view(torch.uint8), sent.contiguous().view(torch.uint8)
            )

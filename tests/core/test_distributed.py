"""Reduction helpers outside torch.distributed (the DDP calibration test runs them on 2 ranks)."""

from __future__ import annotations

import torch

from lightning_compress.core.distributed import (
    ShardSampler,
    all_reduce_max_,
    all_reduce_min_,
    all_reduce_sum_,
    broadcast_,
    check_same_on_all_ranks,
    is_distributed,
)


def test_helpers_are_no_ops_in_one_process():
    tensor = torch.tensor([1.0, -2.0])
    assert not is_distributed()
    for helper in (all_reduce_sum_, all_reduce_min_, all_reduce_max_, broadcast_):
        assert helper(tensor) is tensor
    assert tensor.tolist() == [1.0, -2.0]
    check_same_on_all_ranks(3, "blocks")
    assert list(ShardSampler(5)) == [0, 1, 2, 3, 4] and len(ShardSampler(5)) == 5

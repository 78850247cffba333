"""Counts over ``DTensor`` weights: taken on the shards when a shard can be counted alone,
on the gathered weight otherwise (one process here: a mesh of one rank; the counts over two
FSDP2 ranks are checked in ``tests/lightning/test_hf_lm_fsdp2.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from lightning_compress.core.helpers import model_sparsity
from lightning_compress.core.shard_counts import count_over_shards, zero_count
from lightning_compress.modifiers.pruning.structure import follows_2_4, is_pruned
from lightning_compress.pipelines.coverage import _holds_zeros


def pruned_2_4(rows: int = 8, inputs: int = 16) -> torch.Tensor:
    weight = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(3)) + 5
    weight[:, 0::4] = 0
    weight[:, 1::4] = -0.0
    return weight


@pytest.fixture
def gathers(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the DTensors gathered whole (``full_tensor``) while a test runs."""
    calls: list[tuple[int, ...]] = []
    original = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "full_tensor", recording)
    return calls


def test_row_sharded_weights_are_counted_on_their_shards_like_plain_ones(one_rank_mesh, gathers):
    weight = pruned_2_4()
    weight[3, 6] = 0
    sharded = distribute_tensor(weight, one_rank_mesh, [Shard(0)])
    assert zero_count(sharded) == zero_count(weight) == int((weight == 0).sum()) == 65
    assert is_pruned(sharded) and follows_2_4(sharded)
    assert _holds_zeros(sharded)
    # Only the counts travel (scalars), never the weight.
    assert gathers and all(shape == () for shape in gathers)


def test_a_weight_sharded_along_its_inputs_is_gathered_for_the_2_4_check(one_rank_mesh, gathers):
    sharded = distribute_tensor(pruned_2_4(), one_rank_mesh, [Shard(1)])
    assert zero_count(sharded) == 64 and gathers == [()]  # zeros add up over any shards
    assert follows_2_4(sharded)
    assert gathers[1:] == [(8, 16)]
    sharded = distribute_tensor(torch.ones(8, 16), one_rank_mesh, [Shard(1)])
    assert not follows_2_4(sharded)


def test_a_partial_weight_is_counted_whole(one_rank_mesh, gathers):
    partial = DTensor.from_local(pruned_2_4(), one_rank_mesh, [Partial()], run_check=False)
    assert zero_count(partial) == 64
    assert gathers == [(8, 16)]


def test_counts_of_shards_add_up_and_plain_tensors_are_counted_directly():
    weight = pruned_2_4()
    rows = [weight[:3], weight[3:]]
    assert sum(count_over_shards(part, zero_count) for part in rows) == zero_count(weight)
    assert follows_2_4(weight[:0])  # a shard without rows breaks no run of 4


def test_model_sparsity_counts_sharded_weights_whole(one_rank_mesh):
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(pruned_2_4())
    expected = model_sparsity(model)
    fully_shard(model, mesh=one_rank_mesh)
    assert isinstance(model[0].weight, DTensor)
    assert model_sparsity(model) == expected
    assert expected["0"] == 0.5 and expected["__all__"] == 64 / (128 + 32)

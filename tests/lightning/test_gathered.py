"""``full_model``: the full weights of a sharded (FSDP2) model swapped in on the saving rank,
and the shards put back afterwards (a one-process gloo group: DTensors of one shard)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_compress.lightning.gathered import full_model


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((4,), 0.5))


@pytest.fixture
def one_rank(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_the_saving_rank_sees_full_tied_tensors_and_gets_its_shards_back(one_rank):
    torch.manual_seed(0)
    model = Tied()
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    fully_shard(model, mesh=one_rank)
    before = {name: id(p) for name, p in model.named_parameters()}
    assert isinstance(model.proj.weight, DTensor)

    with full_model(model, keep=True) as sharded:
        assert sharded
        state = model.state_dict()
        assert not any(isinstance(value, DTensor) for value in state.values())
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        assert model.head.weight is model.embed.weight
        assert not model.proj.weight.requires_grad
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert isinstance(model.proj.weight, DTensor)


def test_the_shards_are_put_back_after_an_error(one_rank):
    model = Tied()
    fully_shard(model, mesh=one_rank)
    weight = model.proj.weight
    with pytest.raises(RuntimeError, match="saving failed"), full_model(model, keep=True):
        raise RuntimeError("saving failed")
    assert model.proj.weight is weight


def test_a_model_without_shards_is_left_as_it_is():
    model = Tied()
    weight = model.proj.weight
    with full_model(model, keep=True) as sharded:
        assert not sharded and model.proj.weight is weight

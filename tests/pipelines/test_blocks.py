"""Finding the repeated blocks, and reading their outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.pipelines import find_blocks, hidden_states_of


def test_finds_the_decoder_layers_of_every_architecture(tiny_lm, block_list):
    layers = tiny_lm.get_submodule(block_list)
    blocks = find_blocks(tiny_lm)
    assert [name for name, _ in blocks] == [f"{block_list}.{i}" for i in (0, 1)]
    assert all(block is layer for (_, block), layer in zip(blocks, layers, strict=True))


def test_sequential_targets_override_the_search(tiny_lm, block_list):
    layer_class = type(tiny_lm.get_submodule(block_list)[0]).__name__
    assert find_blocks(tiny_lm, [layer_class]) == find_blocks(tiny_lm)
    with pytest.raises(ValueError, match="match no module.*expected class names among"):
        find_blocks(tiny_lm, ["NoSuchLayer"])


def test_nested_sequential_targets_are_refused(tiny_lm):
    block = find_blocks(tiny_lm)[0][1]
    inner = next(module for module in block.modules() if module is not block)
    with pytest.raises(ValueError, match="nested"):
        find_blocks(tiny_lm, [type(block).__name__, type(inner).__name__])


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
        self.single = nn.ModuleList([nn.Linear(4, 4)])
        self.short = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.long = nn.ModuleList([nn.Tanh(), nn.Tanh(), nn.Tanh()])


def test_picks_the_longest_list_of_one_class():
    assert [name for name, _ in find_blocks(Mixed())] == ["long.0", "long.1", "long.2"]
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == []


def test_hidden_states_of_tensor_and_tuple_outputs():
    hidden = torch.ones(1, 2, 3)
    assert hidden_states_of(hidden) is hidden
    assert hidden_states_of((hidden, None)) is hidden
    with pytest.raises(TypeError, match="expected a tensor of hidden states"):
        hidden_states_of({"hidden_states": hidden})

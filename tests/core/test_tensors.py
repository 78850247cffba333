"""The shared tensor helpers: walking nested inputs, telling one input from another."""

from __future__ import annotations

import torch

from lightning_compress.core.tensors import map_tensors, same_input, tensor_version


def test_map_tensors_reaches_tensors_in_nested_containers_and_keeps_the_rest() -> None:
    a, b = torch.ones(2), torch.zeros(3)
    mapped = map_tensors({"x": (a, [b, "text"]), "n": 4}, lambda tensor: tensor + 1)
    assert torch.equal(mapped["x"][0], a + 1)
    assert torch.equal(mapped["x"][1][0], b + 1)
    assert mapped["x"][1][1] == "text"
    assert mapped["n"] == 4
    assert isinstance(mapped["x"], tuple) and isinstance(mapped["x"][1], list)


def test_same_input_accepts_a_same_layout_view_and_refuses_copies_and_other_layouts() -> None:
    x = torch.randn(4, 6)
    assert same_input(x, x)
    assert same_input(x, x.view(4, 6))
    assert not same_input(x, x.clone())
    assert not same_input(x, x.view(6, 4))
    assert not same_input(x, x.t())
    assert not same_input(x, x[:, :3])


def test_tensor_version_changes_with_an_in_place_change() -> None:
    x = torch.zeros(3)
    before = tensor_version(x)
    x.add_(1)
    assert tensor_version(x) != before
    with torch.inference_mode():
        frozen = torch.zeros(3)
    assert tensor_version(frozen) == 0

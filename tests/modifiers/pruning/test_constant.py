"""ConstantPruningModifier: existing zeros stay fixed while the model is fine-tuned."""

from __future__ import annotations

import copy

import pytest
import torch
from modifiers.pruning.test_magnitude import LAYERS, make_model, masks, start_session, train, zeros
from torch import nn

from lightning_compress.modifiers.pruning import ConstantPruningModifier
from lightning_compress.recipe import RecipeError


def sparsify(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero every other weight of each layer; returns the zero patterns."""
    with torch.no_grad():
        for name in LAYERS:
            model.get_submodule(name).weight.view(-1)[::2] = 0
    return {name: zeros(model, name) for name in LAYERS}


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_zeros_stay_fixed_during_training(optimizer_class):
    model = make_model()
    pattern = sparsify(model)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}
    session = start_session(model, ConstantPruningModifier())
    assert all(torch.equal(masks(model)[name], ~pattern[name]) for name in LAYERS)
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(model.parameters(), lr=0.05, **kwargs)
    for step_pattern in train(session, model, optimizer, range(4)):
        assert all(torch.equal(step_pattern[name], pattern[name]) for name in LAYERS)
    assert not torch.equal(model.fc1.weight.detach(), before["fc1"])  # it did train
    keys = set(model.state_dict())
    session.finalize()
    assert keys - set(model.state_dict()) == {"fc1.weight_mask", "fc2.weight_mask"}
    assert all(torch.equal(zeros(model, name), pattern[name]) for name in LAYERS)


def test_restored_masks_win_on_resume():
    sparse = make_model()
    pattern = sparsify(sparse)
    start_session(sparse, ConstantPruningModifier())
    checkpoint = copy.deepcopy(sparse.state_dict())

    resumed = make_model(seed=1)  # dense: its own mask would keep everything
    session = start_session(resumed, ConstantPruningModifier())
    resumed.load_state_dict(checkpoint)
    train(session, resumed, torch.optim.Adam(resumed.parameters(), lr=0.05), range(3))
    assert all(torch.equal(zeros(resumed, name), pattern[name]) for name in LAYERS)


def test_masks_are_enforced_only_from_start_to_end():
    model = make_model()
    pattern = sparsify(model)
    session = start_session(model, ConstantPruningModifier(start=1, end=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    patterns = train(session, model, optimizer, range(5))
    fixed = [torch.equal(step["fc1"], pattern["fc1"]) for step in patterns]
    assert fixed == [False, True, True, False, False]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"start": -1}, r"start: expected an index >= 0 \(the modifier keeps zeros"),
        ({"start": None}, "start: expected an index >= 0"),
        ({"start": 2, "end": 1}, "end: expected an index at or after start=2.0"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(RecipeError, match=f"ConstantPruningModifier.{message}"):
        ConstantPruningModifier(**settings)


def test_targets_must_hold_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.raises(RecipeError, match=r"targets: layer '1' \(GELU\) has no weight"):
        start_session(model, ConstantPruningModifier(targets=["0", "GELU"]))
    assert "0.weight_mask" not in model.state_dict()

"""MagnitudePruningModifier driven through a CompressionSession by a plain training loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TwoLayer
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_compress.core import BaseLogger, CompressionSession, EventType
from lightning_compress.modifiers.pruning import (
    MagnitudePruningModifier,
    global_masks,
    nm_mask,
    unstructured_mask,
)
from lightning_compress.recipe import Recipe, RecipeError

LAYERS = ("fc1", "fc2")


class Recorder(BaseLogger):
    """Keeps every scalar logged to it."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.scalars: list[tuple[str, float, float | None]] = []

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        self.scalars.append((tag, value, step))

    def tagged(self, suffix: str) -> list[tuple[str, float, float | None]]:
        return [item for item in self.scalars if item[0].endswith(suffix)]


def make_model(seed: int = 0) -> TwoLayer:
    torch.manual_seed(seed)
    return TwoLayer()


def start_session(model: nn.Module, modifier, **kwargs) -> CompressionSession:
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model, **kwargs)
    return session


def built(session: CompressionSession):
    (modifier,) = session.lifecycle.recipe.modifiers
    return modifier


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)


def train(
    session: CompressionSession,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    accumulate: int = 1,
    steps_per_epoch: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Train ``steps`` optimizer steps, emitting the lifecycle events of each batch.

    Returns:
        Each layer's zero pattern (True where the weight is exactly zero) after each step.
    """
    patterns = []
    for step in steps:
        for micro in range(accumulate):
            position = {
                "global_step": step,
                "global_batch": step * accumulate + micro,
                "steps_per_epoch": steps_per_epoch,
                "batches_per_step": accumulate,
            }
            session.event(EventType.BATCH_START, **position)
            inputs, targets = batch(position["global_batch"])
            loss = F.mse_loss(model(inputs), targets) / accumulate
            session.event(EventType.LOSS_CALCULATED, loss=loss, **position)
            loss.backward()
            if micro == accumulate - 1:
                session.event(EventType.OPTIM_PRE_STEP, **position)
                optimizer.step()
                session.event(EventType.OPTIM_POST_STEP, **position)
                optimizer.zero_grad()
            session.event(EventType.BATCH_END, **position)
        patterns.append({name: zeros(model, name) for name in LAYERS})
    return patterns


def zeros(model: nn.Module, name: str) -> torch.Tensor:
    return getattr(model, name).weight.detach() == 0


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(model, name).weight_mask.clone() for name in LAYERS}


def expected_sparsity(index: float, start, end, update, init, final, inter_func) -> float:
    """The schedule by hand: hold the value of the last grid point at or before ``index``."""
    point = min(index, end)
    if update:
        grid = [start, end] + [k * update for k in range(1, int(end / update) + 1)]
        point = max(p for p in grid if start <= p <= index + 1e-9)
    progress = (point - start) / (end - start)
    power = 3 if inter_func == "cubic" else 1
    return final + (init - final) * (1 - progress) ** power


SCHEDULES = {
    "steps-cubic": ({"start": 1, "end": 9}, "cubic", None),
    "steps-linear": ({"start": 0, "end": 6}, "linear", None),
    "steps-update": ({"start": 1, "end": 10, "update": 3}, "cubic", None),
    "fractional-epochs": ({"start": 0.5, "end": 2.25, "update": 0.5}, "cubic", 4),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_sparsity_follows_the_schedule(schedule, optimizer_class):
    timing, inter_func, steps_per_epoch = SCHEDULES[schedule]
    model = make_model()
    modifier = MagnitudePruningModifier(
        init_sparsity=0.1, final_sparsity=0.8, inter_func=inter_func, **timing
    )
    session = start_session(model, modifier)
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(model.parameters(), lr=0.05, **kwargs)
    patterns = train(session, model, optimizer, range(12), steps_per_epoch=steps_per_epoch)

    for step, pattern in enumerate(patterns):
        index = step / steps_per_epoch if steps_per_epoch else step
        if index < timing["start"]:
            assert not any(p.any() for p in pattern.values()), step
            continue
        target = expected_sparsity(
            index, timing["start"], timing["end"], timing.get("update"), 0.1, 0.8, inter_func
        )
        for name, zero in pattern.items():
            assert zero.sum() == round(target * zero.numel()), (step, name)
            if step:
                assert (zero | ~patterns[step - 1][name]).all()  # pruned stays pruned
    assert all(
        zero.float().mean() == pytest.approx(0.8, abs=0.01) for zero in patterns[-1].values()
    )


def test_masks_follow_magnitudes_and_are_logged():
    model = make_model()
    recorder = Recorder()
    modifier = MagnitudePruningModifier(init_sparsity=0.5, final_sparsity=0.5, start=0, end=4)
    expected = {name: unstructured_mask(getattr(model, name).weight.abs(), 0.5) for name in LAYERS}
    session = start_session(model, modifier, loggers=[recorder])
    train(session, model, torch.optim.SGD(model.parameters(), lr=0.01), range(3))
    assert all(torch.equal(model.get_submodule(n).weight_mask, expected[n]) for n in LAYERS)
    assert recorder.tagged("target_sparsity") == [
        ("MagnitudePruningModifier/target_sparsity", 0.5, 0)
    ]
    assert {tag for tag, _, _ in recorder.tagged("/fc1") + recorder.tagged("/fc2")} == {
        "MagnitudePruningModifier/sparsity/fc1",
        "MagnitudePruningModifier/sparsity/fc2",
    }


def test_pruned_weights_stay_pruned_among_other_zeros():
    model = make_model()
    modifier = MagnitudePruningModifier(
        init_sparsity=0.25, final_sparsity=0.5, inter_func="linear", start=0, end=2
    )
    session = start_session(model, modifier)
    session.event(EventType.BATCH_START, global_step=0)
    pruned = ~model.fc1.weight_mask.clone()
    with torch.no_grad():  # many more exact zeros, at lower indices than some pruned ones
        flat = model.fc1.weight.view(-1)
        flat[(~pruned.view(-1)).nonzero()[:60]] = 0
    session.event(EventType.BATCH_END, global_step=0)
    session.event(EventType.BATCH_START, global_step=1)
    now_pruned = ~model.fc1.weight_mask
    assert now_pruned.sum() == 48 and (now_pruned | ~pruned).all()


def test_gradient_accumulation_updates_once_per_step():
    model = make_model()
    recorder = Recorder()
    modifier = MagnitudePruningModifier(final_sparsity=0.6, start=0, end=4)
    session = start_session(model, modifier, loggers=[recorder])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    patterns = train(session, model, optimizer, range(6), accumulate=3)
    assert [step for _, _, step in recorder.tagged("target_sparsity")] == [0, 1, 2, 3, 4]
    for step, pattern in enumerate(patterns):
        target = expected_sparsity(step, 0, 4, None, 0.0, 0.6, "cubic")
        assert all(zero.sum() == round(target * zero.numel()) for zero in pattern.values())


def test_one_shot_prunes_to_final_sparsity_at_finalize():
    model = make_model()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}
    keys = set(model.state_dict())
    session = start_session(model, MagnitudePruningModifier(final_sparsity=0.75))
    session.finalize()
    for name in LAYERS:
        weight = model.get_submodule(name).weight.detach()
        mask = unstructured_mask(before[name].abs(), 0.75)
        assert torch.equal(weight, before[name] * mask)
    assert set(model.state_dict()) == keys  # the mask buffers are gone


def test_one_shot_prunes_at_calibration_start():
    model = make_model()
    session = start_session(model, MagnitudePruningModifier(final_sparsity=0.5))
    session.event(EventType.CALIBRATION_EPOCH_START)
    assert all(zeros(model, name).float().mean() == 0.5 for name in LAYERS)
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()
    assert all(zeros(model, name).float().mean() == 0.5 for name in LAYERS)


def test_one_shot_two_four_structure_is_exact():
    model = make_model()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}
    session = start_session(
        model, MagnitudePruningModifier(final_sparsity=0.5, mask_structure="2:4")
    )
    session.finalize()
    for name in LAYERS:
        weight = model.get_submodule(name).weight.detach()
        assert ((weight != 0).view(weight.shape[0], -1, 4).sum(-1) == 2).all()
        assert torch.equal(weight != 0, nm_mask(before[name].abs(), 2, 4))


def test_gradual_two_four_ends_exact_and_stays_compatible():
    model = make_model()
    modifier = MagnitudePruningModifier(
        init_sparsity=0.1,
        final_sparsity=0.5,
        mask_structure="2:4",
        start=0,
        end=5,
        inter_func="linear",
    )
    session = start_session(model, modifier)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    patterns = train(session, model, optimizer, range(7))
    for step, pattern in enumerate(patterns):
        for zero in pattern.values():
            per_group = zero.view(zero.shape[0], -1, 4).sum(-1)
            assert (per_group <= 2).all(), step
            assert (per_group == 2).all() == (step >= 5), step


def test_global_sparsity_uses_one_threshold():
    model = make_model()
    model.fc2.weight.data *= 4  # larger weights: fc2 keeps more of them
    before = {name: model.get_submodule(name).weight.detach().abs() for name in LAYERS}
    modifier = MagnitudePruningModifier(final_sparsity=0.5, global_sparsity=True)
    start_session(model, modifier).finalize()
    expected = global_masks(before, 0.5)
    assert all(torch.equal(~zeros(model, name), expected[name]) for name in LAYERS)
    assert sum(int(zeros(model, name).sum()) for name in LAYERS) == round(0.5 * (128 + 64))
    assert zeros(model, "fc2").float().mean() < 0.5 < zeros(model, "fc1").float().mean()


def test_recipe_builds_and_writes_back_the_modifier():
    text = """
    args: {sparsity: 0.5}
    prune_stage:
      pruning_modifiers:
        MagnitudePruningModifier:
          final_sparsity: ${args.sparsity}
          mask_structure: "2:4"
          start: 0
          end: 3
          ignore: [fc2]
    """
    recipe = Recipe.create_instance(text)
    (modifier,) = recipe.modifiers
    assert (modifier.final_sparsity, modifier.mask_structure, modifier.end) == (0.5, "2:4", 3.0)
    assert Recipe.create_instance(recipe.yaml()).modifiers[0].spec() == modifier.spec()


RESUMABLE = {"init_sparsity": 0.2, "final_sparsity": 0.7, "start": 1, "end": 7, "update": 2}


def run_with_adam(model: nn.Module, steps: range, state=None, **settings):
    session = start_session(model, MagnitudePruningModifier(**RESUMABLE, **settings))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    if state is not None:
        model.load_state_dict(state["model"])  # strict: the mask buffers already exist
        optimizer.load_state_dict(state["optimizer"])
    train(session, model, optimizer, steps)
    return session, optimizer


@pytest.mark.parametrize("settings", [{}, {"global_sparsity": True}, {"leave_enabled": False}])
@pytest.mark.parametrize("resume_step", [3, 4, 7, 8])
def test_resume_matches_an_uninterrupted_run(settings, resume_step):
    reference = make_model()
    run_with_adam(reference, range(10), **settings)

    first = make_model()
    _, optimizer = run_with_adam(first, range(resume_step), **settings)
    state = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = make_model(seed=1)
    run_with_adam(resumed, range(resume_step, 10), state=state, **settings)

    assert all(torch.equal(masks(resumed)[n], masks(reference)[n]) for n in LAYERS)
    assert all(torch.equal(zeros(resumed, n), zeros(reference, n)) for n in LAYERS)


@pytest.mark.parametrize("leave_enabled", [True, False])
def test_leave_enabled_keeps_masks_after_end(leave_enabled):
    model = make_model()
    modifier = MagnitudePruningModifier(
        final_sparsity=0.5, start=0, end=2, leave_enabled=leave_enabled
    )
    session = start_session(model, modifier)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    patterns = train(session, model, optimizer, range(6))
    assert all(zero.float().mean() == 0.5 for zero in patterns[2].values())
    after_end = patterns[-1]["fc1"].float().mean()
    assert after_end == 0.5 if leave_enabled else after_end < 0.1
    session.finalize()
    assert "weight_mask" not in dict(model.fc1.named_buffers())
    assert zeros(model, "fc1").float().mean() == after_end


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"final_sparsity": 1.0}, r"final_sparsity: expected a float in \[0, 1\), got 1.0"),
        ({"final_sparsity": 0.5, "init_sparsity": -0.1}, r"init_sparsity: expected a float in"),
        (
            {"final_sparsity": 0.5, "init_sparsity": 0.6},
            "init_sparsity: expected a float <= final_sparsity=0.5, got 0.6",
        ),
        ({"final_sparsity": "half"}, "final_sparsity: expected float, got 'half'"),
        (
            {"final_sparsity": 0.5, "mask_structure": "4:2"},
            r"mask_structure: expected 'N:M' with 0 < N < M .*'0:0', got '4:2'",
        ),
        (
            {"final_sparsity": 0.7, "mask_structure": "2:4"},
            r"final_sparsity: expected 0.5 \(= 1 - N/M for mask_structure '2:4'\), got 0.7",
        ),
        ({"final_sparsity": 0.5, "start": 0}, "end: expected an index after start=0.0"),
        ({"final_sparsity": 0.5, "start": 2, "end": 2}, "end: expected an index after start=2.0"),
        ({"final_sparsity": 0.5, "start": None}, "start: expected an index >= 0, or -1"),
        (
            {"final_sparsity": 0.5, "inter_func": "quadratic"},
            r"inter_func: expected one of \['cubic', 'linear'\]",
        ),
        ({"final_sparsity": 0.5, "leave_enabled": "yes"}, "leave_enabled: expected bool"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(RecipeError, match=f"MagnitudePruningModifier.{message}"):
        MagnitudePruningModifier(**settings)


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.odd = nn.Linear(6, 4)
        self.conv = nn.Conv2d(2, 2, 3)
        self.norm = nn.LayerNorm(8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"targets": ["re:.*"]},
            r"targets: layer 'conv' \(Conv2d\) has a weight of shape \(2, 2, 3, 3\); "
            r"expected layers with a 2-D weight such as Linear",
        ),
        ({"targets": ["conv"]}, r"layer 'conv' \(Conv2d\) has a weight of shape \(2, 2, 3, 3\)"),
        ({"targets": ["LayerNorm"]}, r"layer 'norm' \(LayerNorm\) has a weight of shape \(8,\)"),
        ({"targets": ["Sequential"]}, "targets: .*match no module"),
        (
            {"mask_structure": "2:4", "final_sparsity": 0.5},
            r"mask_structure: '2:4' needs in_features divisible by 4, but "
            r"\['odd \(in_features=6\)'\] are not",
        ),
    ],
)
def test_bad_targets(settings, message):
    settings = {"final_sparsity": 0.5, **settings}
    model = Odd()
    with pytest.raises(RecipeError, match=message):
        start_session(model, MagnitudePruningModifier(**settings))
    assert not any("weight_mask" in key for key in model.state_dict())


def test_targets_without_weights_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(RecipeError, match=r"layer '1' \(ReLU\) has no weight; expected layers"):
        start_session(model, MagnitudePruningModifier(final_sparsity=0.5, targets=["re:.*"]))


@pytest.mark.distributed
def test_fsdp2_sharded_weights_get_sharded_masks():
    if dist.is_initialized():
        pytest.skip("needs its own single-rank process group")
    settings = {"final_sparsity": 0.6, "start": 0, "end": 3}
    reference = make_model()
    session = start_session(reference, MagnitudePruningModifier(**settings))
    train(session, reference, torch.optim.Adam(reference.parameters()), range(4))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = make_model()
        session = start_session(model, MagnitudePruningModifier(**settings))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # sharded after the buffers exist
        train(session, model, torch.optim.Adam(model.parameters()), range(4))
        for name in LAYERS:
            mask, weight = model.get_submodule(name).weight_mask, model.get_submodule(name).weight
            assert isinstance(mask, DTensor) and mask.placements == weight.placements
            assert torch.equal(mask.full_tensor(), reference.get_submodule(name).weight_mask)
        session.finalize()
        assert not hasattr(model.fc1, "weight_mask")
        sparsity = (model.fc1.weight.full_tensor() == 0).float().mean().item()
        assert math.isclose(sparsity, round(0.6 * 128) / 128)
    finally:
        dist.destroy_process_group()

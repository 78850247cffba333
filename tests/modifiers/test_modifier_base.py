"""Modifier framework: settings, step/epoch scheduling, one-shot, targets, hooks."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingModifier

from lightning_compress.core import CompressionSession, Event, EventType
from lightning_compress.modifiers import Modifier
from lightning_compress.recipe import RecipeError

STEP = [
    EventType.BATCH_START,
    EventType.LOSS_CALCULATED,
    EventType.OPTIM_PRE_STEP,
    EventType.OPTIM_POST_STEP,
    EventType.BATCH_END,
]


def train(session: CompressionSession, steps: int, **geometry) -> None:
    for step in range(steps):
        for event_type in STEP:
            loss = torch.tensor(1.0) if event_type == EventType.LOSS_CALCULATED else None
            session.event(event_type, loss=loss, global_step=step, **geometry)


def started(session: CompressionSession, model, steps: int, **settings) -> RecordingModifier:
    modifier = RecordingModifier(**settings)
    session.initialize(recipe=modifier, model=model)
    train(session, steps)
    (built,) = session.lifecycle.recipe.modifiers
    return built


def test_step_schedule_starts_and_ends_at_the_right_steps(model):
    session = CompressionSession()
    modifier = started(session, model, 8, start=2, end=5)
    ((_, _, start_step, _),) = modifier.names("start")
    ((_, end_type, end_step, _),) = modifier.names("end")
    assert start_step == 2 and (end_type, end_step) == (EventType.BATCH_END, 5)
    update_steps = sorted({call[2] for call in modifier.names("update")})
    assert update_steps == [2, 3, 4, 5]


def test_epoch_schedule_with_fractional_epochs(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=0.5, end=1.25), model=model)
    train(session, 20, steps_per_epoch=8)
    (modifier,) = session.lifecycle.recipe.modifiers
    assert modifier.names("start")[0][2] == 4  # 0.5 epoch of 8 steps
    assert modifier.names("end")[0][2] == 10  # 1.25 epochs
    assert modifier.names("end")[0][3] == pytest.approx(1.25)


def test_end_minus_one_runs_until_finalize(model):
    session = CompressionSession()
    modifier = started(session, model, 4, start=0, end=-1)
    assert modifier.names("start") and not modifier.names("end")
    session.finalize()
    assert modifier.names("end")[0][1] is None and modifier.ended_


@pytest.mark.parametrize(
    ("start", "end", "update", "geometry", "expected"),
    [
        (0, 10, 3, {}, [0, 3, 6, 9]),
        (2, 10, 3, {}, [2, 5, 8]),
        (2, -1, None, {}, list(range(2, 12))),
        (0.25, 1.0, 0.25, {"steps_per_epoch": 8}, [2, 4, 6, 8]),
    ],
)
def test_update_due_is_a_grid_from_start(start, end, update, geometry, expected):
    modifier = RecordingModifier(start=start, end=end, update=update)
    due = [s for s in range(12) if modifier.update_due(Event(global_step=s, **geometry))]
    assert due == expected


def test_resumed_after_end_still_starts_and_ends(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=1, end=3), model=model)
    for event_type in STEP:
        loss = torch.tensor(1.0) if event_type == EventType.LOSS_CALCULATED else None
        session.event(event_type, loss=loss, global_step=5)
    (modifier,) = session.lifecycle.recipe.modifiers
    assert [c[0] for c in modifier.calls if c[0] in ("start", "end")] == ["start", "end"]


def test_missing_required_setting_is_named():
    class NeedsValue(Modifier, register=False):
        value: float

    with pytest.raises(RecipeError, match=r"NeedsValue: missing required setting\(s\) \['value'\]"):
        NeedsValue()


def test_resumed_run_starts_at_the_resume_step(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=2, end=9), model=model)
    for event_type in STEP:
        loss = torch.tensor(1.0) if event_type == EventType.LOSS_CALCULATED else None
        session.event(event_type, loss=loss, global_step=6)
    (modifier,) = session.lifecycle.recipe.modifiers
    assert modifier.names("start")[0][2] == 6


def test_one_shot_runs_during_calibration(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=-1), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    train(session, 3)
    assert not modifier.names("start")
    session.event(EventType.CALIBRATION_EPOCH_START)
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph="fc1")
    session.event(EventType.CALIBRATION_EPOCH_END)
    kinds = [call[0] for call in modifier.calls if call[0] != "event"]
    assert kinds == ["initialize", "start", "end"]
    session.finalize()
    assert [call[0] for call in modifier.calls if call[0] != "event"][-1] == "finalize"
    assert len(modifier.names("start")) == 1


def test_one_shot_without_calibration_runs_at_finalize(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=-1), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    session.finalize()
    kinds = [call[0] for call in modifier.calls]
    assert kinds == ["initialize", "start", "end", "finalize"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"start": -2}, "start: expected an index >= 0, or -1"),
        ({"end": -3}, "end: expected an index >= 0, or -1"),
        ({"update": -1}, "update: expected an interval >= 0"),
        ({"start": 3, "end": 1}, "end: expected an index at or after start=3.0"),
        ({"targets": 5}, "targets: expected str or list of str, got 5"),
        ({"ignore": "fc1"}, "ignore: expected list of str"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(RecipeError, match=message):
        RecordingModifier(**settings)


def test_positional_settings_are_refused():
    with pytest.raises(RecipeError, match="keyword only"):
        RecordingModifier("fc1")


def test_ints_become_floats_and_spec_lists_non_defaults():
    modifier = RecordingModifier(start=3, update="1e-1")
    assert modifier.start == 3.0 and isinstance(modifier.start, float)
    assert modifier.update == pytest.approx(0.1)
    assert modifier.spec() == {"start": 3.0, "update": 0.1}


def test_hooks_run_can_be_disabled_and_are_removed_at_finalize(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(targets="Linear"), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    x = torch.randn(2, 8)
    model(x)
    assert modifier.forward_calls == 2 and modifier.num_hooks == 2
    with modifier.hooks_disabled():
        model(x)
    with Modifier.disable_hooks():
        model(x)
    assert modifier.forward_calls == 2
    model(x)
    assert modifier.forward_calls == 4
    session.finalize()
    assert modifier.num_hooks == 0
    model(x)
    assert modifier.forward_calls == 4
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("stage", ["start", "update", "end"])
def test_hooks_are_removed_when_a_callback_fails(model, stage):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(start=0, end=1, fail_on=stage), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    assert modifier.num_hooks == 2
    with pytest.raises(RuntimeError, match="injected"):
        train(session, 3)
    assert modifier.num_hooks == 0
    assert not any(m._forward_hooks for m in model.modules())


def test_finalize_failure_still_removes_hooks(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(fail_on="finalize"), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    with pytest.raises(RuntimeError, match="injected"):
        session.finalize()
    assert modifier.num_hooks == 0 and modifier.finalized_


def test_unknown_hook_kind(model):
    modifier = RecordingModifier()
    with pytest.raises(ValueError, match="hook kind 'sideways'"):
        modifier.register_hook(model, lambda *a: None, "sideways")


def test_optimizer_post_step_hook(model):
    modifier = RecordingModifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    modifier.register_hook(
        optimizer, lambda opt, args, kwargs: seen.append(opt), "optimizer_step_post"
    )
    optimizer.step()
    modifier.remove_hooks()
    optimizer.step()
    assert seen == [optimizer]


def test_lifecycle_misuse_of_a_modifier(model):
    from lightning_compress.core import Event, State

    modifier = RecordingModifier()
    state = State(model=model)
    with pytest.raises(RuntimeError, match="not initialized"):
        modifier.update_event(state, Event(type_=EventType.BATCH_START))
    with pytest.raises(RuntimeError, match="not initialized"):
        modifier.finalize(state)
    modifier.initialize(state)
    with pytest.raises(RuntimeError, match="already initialized"):
        modifier.initialize(state)


def test_buffers_are_added_and_removed_on_abort(model):
    from lightning_compress.core import State

    other = RecordingModifier()
    other.add_buffer(model.fc2, "weight_mask", torch.ones(4, 16))
    modifier = RecordingModifier()
    with pytest.raises(ValueError, match="another modifier"):
        modifier.add_buffer(model.fc2, "weight_mask", torch.ones(4, 16))
    modifier.add_buffer(model.fc1, "weight_mask", torch.ones(16, 8))
    assert "fc1.weight_mask" in model.state_dict()
    modifier.add_buffer(model.fc1, "weight_mask", torch.zeros(16, 8))
    assert model.fc1.weight_mask.sum() == 0
    with pytest.raises(ValueError, match="already has an attribute 'weight'"):
        modifier.add_buffer(model.fc1, "weight", torch.ones(1))
    modifier.abort(State(model=model))
    assert "fc1.weight_mask" not in model.state_dict()


class CalibrationHooks(Modifier):
    """Records the named calibration hooks in the order they run, with ``on_start``/``on_end``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls: list[tuple[str, object]] = []

    def on_calibration_start(self, state, event) -> None:
        self.calls.append(("calibration_start", event.type_))

    def on_start(self, state, event, **kwargs) -> None:
        self.calls.append(("start", event.type_))

    def on_sequential_epoch_end(self, state, subgraph) -> None:
        self.calls.append(("sequential_epoch_end", subgraph))

    def on_calibration_end(self, state, event) -> None:
        self.calls.append(("calibration_end", event.type_))

    def on_end(self, state, event, **kwargs) -> None:
        self.calls.append(("end", event.type_))


def test_calibration_events_reach_the_named_hooks_before_start_and_end(model):
    session = CompressionSession()
    session.initialize(recipe=CalibrationHooks(), model=model)
    (modifier,) = session.lifecycle.recipe.modifiers
    session.event(EventType.CALIBRATION_EPOCH_START)
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.fc1)
    session.event(EventType.CALIBRATION_EPOCH_END)
    assert modifier.calls == [
        ("calibration_start", EventType.CALIBRATION_EPOCH_START),
        ("start", EventType.CALIBRATION_EPOCH_START),
        ("sequential_epoch_end", model.fc1),
        ("calibration_end", EventType.CALIBRATION_EPOCH_END),
        ("end", EventType.CALIBRATION_EPOCH_END),
    ]

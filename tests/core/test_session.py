"""CompressionSession and CompressionLifecycle: the page's behaviour and errors."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingModifier

from lightning_compress.core import (
    BaseLogger,
    CompressionLifecycle,
    CompressionSession,
    EventType,
    ModifiedState,
)
from lightning_compress.recipe import RecipeError

TWO_STAGES = """
first_stage:
  a_modifiers:
    RecordingModifier: {targets: fc1}
second_stage:
  a_modifiers:
    RecordingModifier: {targets: fc2}
"""

TRAIN_STEP = [
    EventType.BATCH_START,
    EventType.LOSS_CALCULATED,
    EventType.OPTIM_PRE_STEP,
    EventType.OPTIM_POST_STEP,
    EventType.BATCH_END,
]


def run_events(session: CompressionSession, events: list[EventType], **kwargs) -> None:
    for event_type in events:
        loss = torch.tensor(1.0) if event_type == EventType.LOSS_CALCULATED else None
        session.event(event_type, loss=loss, **kwargs)


def only(session: CompressionSession) -> RecordingModifier:
    (modifier,) = session.lifecycle.recipe.modifiers
    return modifier


def test_initialize_returns_modified_state_with_modifier_data(model):
    session = CompressionSession()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = session.initialize(recipe=RecordingModifier(), model=model, optimizer=optimizer)
    assert isinstance(result, ModifiedState)
    assert result.model is model and result.optimizer is optimizer
    assert result.modifier_data == [{"initialized": "RecordingModifier"}]
    assert session.lifecycle.initialized_ and session.state.model is model


def test_initialize_without_recipe_runs_no_modifier(model):
    session = CompressionSession()
    session.initialize(model=model)
    assert session.lifecycle.recipe.modifiers == []
    run_events(session, TRAIN_STEP)
    assert session.finalize().modifier_data == []


def test_second_initialize_only_updates_state(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    modifier = only(session)
    session.initialize(recipe=RecordingModifier(targets="fc2"), steps_per_epoch=5)
    assert only(session) is modifier and session.state.steps_per_epoch == 5


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", "before initializing"),
        ("finalized", "after finalizing"),
    ],
)
def test_event_outside_lifecycle_is_an_error(model, setup, message):
    session = CompressionSession()
    if setup == "finalized":
        session.initialize(recipe=RecordingModifier(), model=model)
        session.finalize()
    with pytest.raises(ValueError, match=message):
        session.event(EventType.BATCH_START)


@pytest.mark.parametrize("event_type", [EventType.INITIALIZE, EventType.FINALIZE])
def test_initialize_and_finalize_through_event_are_errors(model, event_type):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    with pytest.raises(ValueError, match="Use the corresponding method"):
        session.event(event_type)


def test_loss_calculated_without_loss_is_an_error_and_changes_nothing(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    session.event(EventType.BATCH_START)
    calls = list(only(session).calls)
    with pytest.raises(ValueError, match="Loss must be provided"):
        session.event(EventType.LOSS_CALCULATED)
    assert only(session).calls == calls
    session.event(EventType.LOSS_CALCULATED, loss=torch.tensor(2.0))


@pytest.mark.parametrize(
    "events",
    [
        [EventType.BATCH_START, EventType.BATCH_START],
        [EventType.BATCH_START, EventType.BATCH_END, EventType.LOSS_CALCULATED],
        [
            EventType.BATCH_START,
            EventType.OPTIM_POST_STEP,
            EventType.OPTIM_PRE_STEP,
            EventType.BATCH_END,
            EventType.OPTIM_PRE_STEP,
        ],
        [EventType.BATCH_START, EventType.BATCH_END, EventType.OPTIM_POST_STEP],
    ],
)
def test_training_events_out_of_order_are_errors(model, events):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    with pytest.raises(ValueError, match="Lifecycle events must appear following order"):
        run_events(session, events)


def test_accepted_orders_accumulation_several_optimizers_and_calibration(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    accumulation = [EventType.BATCH_START, EventType.LOSS_CALCULATED, EventType.BATCH_END]
    two_optimizers = [
        EventType.BATCH_START,
        EventType.LOSS_CALCULATED,
        EventType.OPTIM_PRE_STEP,
        EventType.OPTIM_POST_STEP,
        EventType.LOSS_CALCULATED,
        EventType.OPTIM_PRE_STEP,
        EventType.OPTIM_POST_STEP,
        EventType.BATCH_END,
    ]
    calibration = [
        EventType.CALIBRATION_EPOCH_START,
        EventType.SEQUENTIAL_EPOCH_END,
        EventType.CALIBRATION_EPOCH_END,
    ]
    run_events(session, accumulation + TRAIN_STEP + two_optimizers + calibration)


def test_events_carry_step_geometry_to_modifiers(model):
    session = CompressionSession()
    session.initialize(
        recipe=RecordingModifier(), model=model, steps_per_epoch=4, batches_per_step=2
    )
    session.event(EventType.BATCH_START, global_step=6, global_batch=13)
    (_, event_type, step, index) = only(session).names("event")[-1]
    assert (event_type, step, index) == (EventType.BATCH_START, 6, 1.5)


def test_lifecycle_counts_steps_when_the_caller_does_not(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    for _ in range(3):
        run_events(session, TRAIN_STEP)
    assert session.lifecycle.global_step == 3 and session.lifecycle.global_batch == 3
    steps = [call[2] for call in only(session).names("event") if call[1] == EventType.BATCH_START]
    assert steps == [0, 1, 2]


def test_event_returns_modifier_data(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    session.event(EventType.BATCH_START)
    loss = torch.tensor(3.0)
    result = session.event(EventType.LOSS_CALCULATED, loss=loss)
    assert result.modifier_data == [loss] and result.loss is loss


def test_finalize_errors(model):
    session = CompressionSession()
    with pytest.raises(ValueError, match="before initializing"):
        session.finalize()
    session.initialize(recipe=RecordingModifier(), model=model)
    assert session.finalize().modifier_data == ["finalized"]
    with pytest.raises(ValueError, match="more than once"):
        session.finalize()


def test_reset_finalizes_active_modifiers_and_clears_everything(model):
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model)
    modifier = only(session)
    session.reset()
    assert modifier.finalized_ and modifier.names("finalize")
    assert not session.lifecycle.initialized_
    assert session.state.model is None and session.lifecycle.recipe.modifiers == []


def test_stages_run_one_after_another_with_reset_stage(model):
    session = CompressionSession()
    session.initialize(recipe=TWO_STAGES, recipe_stage="first_stage", model=model)
    first = only(session)
    assert list(first.layers) == ["fc1"]
    session.finalize()
    session.reset_stage()
    session.initialize(recipe_stage="second_stage")
    second = only(session)
    assert list(second.layers) == ["fc2"] and second is not first
    assert session.state.model is model
    assert "second_stage" in session.get_serialized_recipe()
    assert "first_stage" not in session.get_serialized_recipe()


def test_without_stage_every_stage_runs(model):
    session = CompressionSession()
    session.initialize(recipe=TWO_STAGES, model=model)
    assert len(session.lifecycle.recipe.modifiers) == 2


def test_unknown_stage_is_an_error_naming_the_stages(model):
    session = CompressionSession()
    with pytest.raises(RecipeError, match=r"first_stage.*second_stage"):
        session.initialize(recipe=TWO_STAGES, recipe_stage="third_stage", model=model)
    assert not session.lifecycle.initialized_


def test_failed_initialize_leaves_session_and_model_as_they_were(model):
    session = CompressionSession()
    bad = [RecordingModifier(targets="fc1"), RecordingModifier(targets="fc2", fail_on="initialize")]
    first = bad[0]
    with pytest.raises(RuntimeError, match="injected"):
        session.initialize(recipe=bad, model=model, steps_per_epoch=3)
    assert session.state.model is None and session.state.steps_per_epoch is None
    assert not session.lifecycle.initialized_
    assert first.num_hooks == 0
    assert not any(module._forward_hooks for module in model.modules())


def test_targets_matching_nothing_fail_initialize(model):
    session = CompressionSession()
    with pytest.raises(RecipeError, match="match no module"):
        session.initialize(recipe=RecordingModifier(targets="Conv2d"), model=model)
    assert session.state.model is None


def test_get_serialized_recipe_round_trips(model):
    session = CompressionSession()
    session.initialize(recipe=TWO_STAGES, model=model)
    text = session.get_serialized_recipe()
    other = CompressionSession()
    other.initialize(recipe=text, model=model)
    assert other.lifecycle.recipe == session.lifecycle.recipe


def test_log_writes_loss_and_model_info(model):
    class Sink(BaseLogger):
        def __init__(self):
            super().__init__("sink")
            self.scalars = {}

        def log_scalar(self, tag, value, step=None):
            self.scalars[tag] = value

    sink = Sink()
    session = CompressionSession()
    session.initialize(recipe=RecordingModifier(), model=model, loggers=[sink])
    with torch.no_grad():
        model.fc1.weight[:2] = 0
    session.log(EventType.LOSS_CALCULATED, loss=torch.tensor(0.25))
    assert sink.scalars["Loss/loss"] == pytest.approx(0.25)
    assert sink.scalars["ParamPruning/fc1"] == pytest.approx(2 / 16)
    assert 0 < sink.scalars["ParamPruning/__all__"] < 2 / 16


def test_lifecycle_defaults_match_the_page():
    lifecycle = CompressionLifecycle()
    assert not lifecycle.initialized_ and not lifecycle.finalized
    assert lifecycle.global_step == 0
    assert lifecycle._last_event_type == EventType.BATCH_END
    assert lifecycle._event_order == TRAIN_STEP

"""State, Data, Hardware and ModifiedState."""

from __future__ import annotations

import torch

from lightning_compress.core import (
    BaseLogger,
    Data,
    Hardware,
    LoggerManager,
    ModifiedState,
    State,
)


def test_defaults():
    state = State()
    assert state.model is None and state.optimizer is None and state.loss is None
    assert state.data == Data() and state.hardware == Hardware()
    assert not state.compression_ready
    assert Hardware().rank is None and Data().calib is None


def test_update_sets_everything_given(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = State()
    rest = state.update(
        model=model,
        teacher_model="teacher",
        optimizer=optimizer,
        attach_optim_callbacks=False,
        train_data=[1],
        val_data=[2],
        test_data=[3],
        calib_data=[4],
        start=1.0,
        steps_per_epoch=10,
        batches_per_step=2,
        model_log_cadence=0.5,
        device="cpu",
        extra=5,
    )
    assert rest == {"device": "cpu", "extra": 5}
    assert state.model is model and state.teacher_model == "teacher"
    assert state.optimizer is optimizer and state.optim_wrapped is False
    assert state.compression_ready
    assert (state.data.train, state.data.val, state.data.test, state.data.calib) == (
        [1],
        [2],
        [3],
        [4],
    )
    assert (state.start, state.steps_per_epoch, state.batches_per_step) == (1.0, 10, 2)
    assert state.model_log_cadence == 0.5
    assert state.hardware.device == "cpu"
    assert isinstance(state.loggers, LoggerManager)


def test_copy_data_deep_copies_unless_disabled():
    data = [[1, 2]]
    state = State()
    state.update(train_data=data)
    data[0].append(3)
    assert state.data.train == [[1, 2]]
    state.update(train_data=data, copy_data=False)
    assert state.data.train is data


def test_update_keeps_values_not_given(model):
    state = State()
    state.update(model=model, steps_per_epoch=4)
    managers = state.loggers
    state.update()
    assert state.model is model and state.steps_per_epoch == 4
    assert state.loggers is managers


def test_loggers_list_becomes_a_manager():
    class Sink(BaseLogger):
        pass

    sink = Sink("sink")
    state = State()
    state.update(loggers=[sink])
    assert sink in state.loggers.loggers


def test_modified_state_holds_its_values():
    modified = ModifiedState(model="m", optimizer="o", loss=1.0, modifier_data=[{"a": 1}])
    assert (modified.model, modified.optimizer, modified.loss) == ("m", "o", 1.0)
    assert modified.modifier_data == [{"a": 1}]
    assert "loss=1.0" in repr(modified)

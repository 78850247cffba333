"""Event geometry and schedule checks, against the reference page's semantics."""

from __future__ import annotations

import pytest

from lightning_compress.core import Event, EventType


def test_event_types_are_the_reference_set():
    names = {item.name for item in EventType}
    assert names == {
        "INITIALIZE",
        "FINALIZE",
        "BATCH_START",
        "LOSS_CALCULATED",
        "BATCH_END",
        "CALIBRATION_EPOCH_START",
        "SEQUENTIAL_EPOCH_END",
        "CALIBRATION_EPOCH_END",
        "OPTIM_PRE_STEP",
        "OPTIM_POST_STEP",
    }


def test_defaults():
    event = Event()
    assert event.type_ is None
    assert (event.steps_per_epoch, event.batches_per_step) == (None, None)
    assert (event.invocations_per_step, event.global_step, event.global_batch) == (1, 0, 0)


def test_step_based_event_uses_global_step_as_index():
    event = Event(global_step=7)
    assert not event.epoch_based
    assert event.current_index == 7


@pytest.mark.parametrize("name", ["epoch", "epoch_full", "epoch_step", "epoch_batch"])
def test_epoch_properties_need_steps_per_epoch(name):
    with pytest.raises(ValueError, match="not epoch based"):
        getattr(Event(global_step=3), name)


def test_epoch_properties():
    event = Event(steps_per_epoch=10, batches_per_step=4, global_step=23, global_batch=95)
    assert event.epoch_based
    assert event.epoch == 2
    assert event.epoch_full == pytest.approx(2.3)
    assert event.epoch_step == 3
    assert event.epoch_batch == 95 % 40
    assert event.current_index == pytest.approx(2.3)


def test_epoch_batch_without_accumulation():
    event = Event(steps_per_epoch=10, global_step=12, global_batch=12)
    assert event.epoch_batch == 2


def test_current_index_setter_step_based():
    event = Event(batches_per_step=4)
    event.current_index = 5
    assert (event.global_step, event.global_batch) == (5, 20)


def test_current_index_setter_epoch_based_fractional():
    event = Event(steps_per_epoch=100, batches_per_step=1)
    event.current_index = 0.29  # 0.29 * 100 is 28.999... in floating point
    assert (event.global_step, event.global_batch) == (29, 29)
    event.current_index = 1.5
    assert event.global_step == 150


def test_new_instance_is_a_deep_copy():
    event = Event(type_=EventType.BATCH_START, global_step=3)
    other = event.new_instance(global_step=9, type_=EventType.BATCH_END)
    assert (event.global_step, event.type_) == (3, EventType.BATCH_START)
    assert (other.global_step, other.type_) == (9, EventType.BATCH_END)


@pytest.mark.parametrize(
    ("step", "start", "end", "update", "expected"),
    [
        (5, None, None, None, True),
        (5, 6, None, None, False),
        (6, 6, None, None, True),
        (11, None, 10, None, False),
        (10, None, 10, None, True),
        (6, 0, None, 3, True),
        (7, 0, None, 3, False),
        (7, 0, None, 0.0, True),
    ],
)
def test_should_update_step_based(step, start, end, update, expected):
    assert Event(global_step=step).should_update(start, end, update) is expected


def test_should_update_fractional_epochs_fire_where_expected():
    fired = [
        step
        for step in range(0, 31)
        if Event(steps_per_epoch=10, global_step=step).should_update(0.0, 2.0, 0.1)
    ]
    assert fired == list(range(0, 21))
    fired = [
        step
        for step in range(0, 31)
        if Event(steps_per_epoch=10, global_step=step).should_update(0.5, 2.0, 0.3)
    ]
    assert fired == [6, 9, 12, 15, 18]


def test_too_many_steps_per_epoch_is_an_error():
    assert Event(steps_per_epoch=10, global_step=5).current_index == 0.5
    with pytest.raises(ValueError, match="Too many steps per epoch"):
        _ = _OverflowEvent(steps_per_epoch=10, global_step=25).current_index


class _OverflowEvent(Event):
    """An event whose whole epoch lags its fraction, as with an inconsistent geometry."""

    @property
    def epoch(self) -> int:
        return 0

"""active_session, create_session, reset_session and LifecycleCallbacks."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import RecordingModifier

from lightning_compress.core import (
    CompressionSession,
    EventType,
    LifecycleCallbacks,
    active_session,
    create_session,
    reset_session,
)


def test_active_session_is_a_process_wide_default():
    assert isinstance(active_session(), CompressionSession)
    assert active_session() is active_session()


def test_create_session_activates_and_restores():
    outer = active_session()
    with create_session() as first:
        assert active_session() is first and first is not outer
        with create_session() as second:
            assert active_session() is second
        assert active_session() is first
    assert active_session() is outer


def test_create_session_restores_after_an_error():
    outer = active_session()
    with pytest.raises(KeyError), create_session():
        raise KeyError("boom")
    assert active_session() is outer


def test_sessions_are_isolated_between_threads(model):
    seen = {}
    barrier = threading.Barrier(2)

    def work(name: str, steps: int) -> None:
        with create_session() as session:
            session.initialize(recipe=RecordingModifier(), model=model)
            barrier.wait()
            for _ in range(steps):
                LifecycleCallbacks.batch_start()
                LifecycleCallbacks.batch_end()
            barrier.wait()
            seen[name] = (active_session() is session, session.lifecycle.global_batch)

    threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", 2), ("b", 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": (True, 2), "b": (True, 5)}


def test_reset_session_resets_the_active_one(model):
    with create_session() as session:
        session.initialize(recipe=RecordingModifier(), model=model)
        reset_session()
        assert not session.lifecycle.initialized_ and session.state.model is None


def test_callbacks_dispatch_every_event_in_order(model):
    with create_session() as session:
        session.initialize(recipe=RecordingModifier(), model=model)
        LifecycleCallbacks.batch_start(batch_data={"x": 1})
        LifecycleCallbacks.loss_calculated(loss=torch.tensor(1.0))
        LifecycleCallbacks.optim_pre_step()
        LifecycleCallbacks.optim_post_step()
        LifecycleCallbacks.batch_end()
        LifecycleCallbacks.calibration_epoch_start()
        LifecycleCallbacks.sequential_epoch_end(subgraph="layer0")
        result = LifecycleCallbacks.calibration_epoch_end()
        (modifier,) = session.lifecycle.recipe.modifiers
        received = [call[1] for call in modifier.names("event")]
        assert received == [
            EventType.BATCH_START,
            EventType.LOSS_CALCULATED,
            EventType.OPTIM_PRE_STEP,
            EventType.OPTIM_POST_STEP,
            EventType.BATCH_END,
            EventType.CALIBRATION_EPOCH_START,
            EventType.SEQUENTIAL_EPOCH_END,
            EventType.CALIBRATION_EPOCH_END,
        ]
        assert session.state.batch_data == {"x": 1}
        assert result.model is model


@pytest.mark.parametrize("event_type", [EventType.INITIALIZE, EventType.FINALIZE])
def test_callbacks_refuse_initialize_and_finalize(event_type):
    with pytest.raises(ValueError, match="Use the corresponding method"):
        LifecycleCallbacks.event(event_type)

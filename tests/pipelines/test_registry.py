"""``pipeline="auto"``, the basic and the data-free pipelines."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TwoLayer
from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession, Event, EventType, State
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines import (
    BasicPipeline,
    DataFreePipeline,
    PipelineOptions,
    SequentialPipeline,
    create_pipeline,
    resolve_pipeline,
)


class ForwardCounter(Modifier):
    """Counts forwards of its targets and records the events it receives."""

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.forwards = 0
        self.events: list[EventType] = []
        for module in self.resolve_targets(state.model).values():
            self.register_hook(module, self._count, "forward")

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        self.forwards += 1

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        self.events.append(event.type_)


def session_for(model: nn.Module) -> CompressionSession:
    session = CompressionSession()
    session.initialize(recipe=ForwardCounter(targets=["fc1"]), model=model)
    return session


def test_auto_picks_data_free_sequential_or_basic_with_a_warning(model):
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        assert resolve_pipeline("auto", model, has_data=False) == "data_free"
        assert resolve_pipeline("auto", model, has_data=True) == "basic"
        stacked = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
        assert resolve_pipeline("auto", stacked, has_data=True) == "sequential"
        assert resolve_pipeline("basic", stacked, has_data=True) == "basic"
    finally:
        logger.remove(sink)
    (message,) = messages
    assert "no repeated blocks found; falling back to basic" in message
    assert "TwoLayer" in message
    with pytest.raises(ValueError, match="pipeline='fast' is not known"):
        resolve_pipeline("fast", model, has_data=True)
    with pytest.raises(ValueError, match="no repeated blocks"):
        SequentialPipeline(model, session_for(model), PipelineOptions())


def test_basic_runs_the_whole_model_per_batch_without_sequential_events(model):
    session = session_for(model)
    pipeline = create_pipeline("auto", model, session, PipelineOptions())
    assert isinstance(pipeline, BasicPipeline)
    pipeline([torch.randn(3, 8), (torch.randn(2, 8),)])
    (counter,) = session.lifecycle.recipe.modifiers
    assert counter.forwards == 2
    assert counter.events == [
        EventType.CALIBRATION_EPOCH_START,
        EventType.CALIBRATION_EPOCH_END,
    ]


def test_data_free_emits_start_and_end_and_refuses_data(model):
    session = session_for(model)
    pipeline = create_pipeline("auto", model, session, PipelineOptions(), has_data=False)
    assert isinstance(pipeline, DataFreePipeline)
    pipeline([])
    (counter,) = session.lifecycle.recipe.modifiers
    assert counter.events == [
        EventType.CALIBRATION_EPOCH_START,
        EventType.CALIBRATION_EPOCH_END,
    ]
    other = session_for(TwoLayer())
    with pytest.raises(ValueError, match="takes no calibration data"):
        create_pipeline("data_free", other.state.model, other, PipelineOptions())([1])
    assert all(not m._forward_hooks for m in other.state.model.modules())

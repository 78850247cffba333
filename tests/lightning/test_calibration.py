"""CalibrationModule under Trainer.validate: events, logging, refusals and clean-up."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import int8_channel_groups
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import CompressionSession, Event, EventType, State
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers import Modifier, QuantizationModifier
from lightning_compress.recipe import RecipeError

START, SEQ, END = (
    EventType.CALIBRATION_EPOCH_START,
    EventType.SEQUENTIAL_EPOCH_END,
    EventType.CALIBRATION_EPOCH_END,
)


class CalibrationEvents(Modifier):
    """Records events and subgraphs; observes every Linear; can fail at one block."""

    fail_at_block: int | None = None

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.events: list[tuple[EventType, Any]] = []
        self.observed = 0
        for module in self.resolve_targets(state.model).values():
            self.register_hook(module, self._observe, "forward")

    def _observe(self, module: nn.Module, args: Any, output: Any) -> None:
        self.observed += 1

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        subgraph = kwargs.get("subgraph")
        self.events.append((event.type_, subgraph))
        layers = list(state.model.model.layers)
        if subgraph is not None and layers.index(subgraph) == self.fail_at_block:
            raise RuntimeError("injected calibration failure")


class MetricsRecorder(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    config = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4)
    return TinyDecoder(config).eval()


def loader() -> DataLoader:
    return DataLoader(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0)), 2)


def trainer(**kwargs: Any) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    return Trainer(**{**defaults, **kwargs})


def all_hooks(model: nn.Module) -> list[Any]:
    return [h for m in model.modules() for h in (*m._forward_hooks, *m._forward_pre_hooks)]


def test_validate_runs_the_calibration_events_and_logs_each_block():
    model = tiny_decoder()
    module = CalibrationModule(model, CalibrationEvents(targets=["re:.*layers.*proj"]))
    recorder = MetricsRecorder()
    trainer(logger=recorder).validate(module, dataloaders=loader(), verbose=False)

    (modifier,) = module.session.lifecycle.recipe.modifiers
    layers = list(model.model.layers)
    assert modifier.events == [(START, None), *((SEQ, layer) for layer in layers), (END, None)]
    assert modifier.observed == 3 * 3 * 7  # batches x blocks x projections, once each
    assert module.session.lifecycle.finalized and all_hooks(model) == []
    assert [report.forwards for report in module.block_reports] == [1, 1, 1]
    names = [f"compression/calibration/seconds/model.layers.{i}" for i in range(3)]
    assert set(names) <= set(recorder.metrics)


def test_weight_only_rtn_needs_one_forward_per_block_and_matches_data_free():
    rtn = QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])
    data_free = tiny_decoder()
    session = CompressionSession()
    session.initialize(recipe=rtn, model=data_free)
    session.finalize()

    model = tiny_decoder()
    module = CalibrationModule(model, rtn)
    trainer().validate(module, dataloaders=loader(), verbose=False)
    assert [report.forwards for report in module.block_reports] == [1, 1, 1]
    expected = data_free.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_inference_mode_is_refused_before_anything_happens():
    model = tiny_decoder()
    module = CalibrationModule(model, CalibrationEvents())
    with pytest.raises(RuntimeError, match=r"needs Trainer\(inference_mode=False\)"):
        trainer(inference_mode=True).validate(module, dataloaders=loader())
    assert not module.session.lifecycle.initialized_ and all_hooks(model) == []


def test_a_failing_block_aborts_the_session_and_removes_every_hook():
    model = tiny_decoder().train()
    module = CalibrationModule(model, CalibrationEvents(fail_at_block=1))
    with pytest.raises(RuntimeError, match="injected calibration failure"):
        trainer().validate(module, dataloaders=loader())
    assert all_hooks(model) == []
    assert all(m.training for m in model.modules())
    assert all(m.finalized_ for m in module.session.lifecycle.recipe.modifiers)


def test_bad_arguments_fail_on_construction():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        CalibrationModule("model", CalibrationEvents())
    with pytest.raises(RecipeError, match="unknown modifier 'NoSuchModifier'"):
        CalibrationModule(tiny_decoder(), {"quant_modifiers": {"NoSuchModifier": {}}})
    with pytest.raises(ValueError, match="not both"):
        CalibrationModule(tiny_decoder(), CompressionSession(), session=CompressionSession())


def test_calibrate_runs_without_a_trainer_data_free():
    model = tiny_decoder()
    module = CalibrationModule(model, CalibrationEvents())
    assert module.calibrate() is model
    (modifier,) = module.session.lifecycle.recipe.modifiers
    assert [event for event, _ in modifier.events] == [START, END]

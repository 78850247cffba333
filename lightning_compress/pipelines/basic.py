"""The basic pipeline: the whole model runs every calibration batch."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from lightning_compress.core import CompressionSession
from lightning_compress.pipelines.base import CalibrationPipeline, PipelineOptions, placed_on
from lightning_compress.pipelines.capture import call_model

__all__ = ["BasicPipeline"]


class BasicPipeline(CalibrationPipeline):
    """Runs each batch through the whole model with the modifiers' hooks active.

    For models without repeated blocks. Modifiers compress at CALIBRATION_EPOCH_END; there is
    no SEQUENTIAL_EPOCH_END. The model moves to ``options.device`` for the epoch.
    """

    name = "basic"

    def __init__(
        self, model: nn.Module, session: CompressionSession, options: PipelineOptions
    ) -> None:
        super().__init__(model, session, options)
        self._placement = ExitStack()

    def start(self) -> None:
        self._placement.enter_context(placed_on(self.model, self.options.device))
        super().start()

    def add_batch(self, batch: Any) -> None:
        with torch.no_grad():
            call_model(self.model, batch)

    def close(self) -> None:
        self._placement.close()
        super().close()

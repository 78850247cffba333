"""A session logger that writes metrics to a Trainer's own loggers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_compress.core.logger import BaseLogger

__all__ = ["TrainerLogger"]


class TrainerLogger(BaseLogger):
    """Forwards session metrics to every logger of ``trainer`` (rank zero only).

    Args:
        trainer: the Trainer whose loggers receive the metrics.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__("trainer")
        self.trainer = trainer

    @rank_zero_only
    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        self.log_scalars("", {tag: value}, step)

    @rank_zero_only
    def log_scalars(self, tag: str, values: dict[str, float], step: float | None = None) -> None:
        prefix = f"{tag}/" if tag else ""
        metrics = {f"compression/{prefix}{key}": value for key, value in values.items()}
        for item in self.trainer.loggers:
            item.log_metrics(metrics, step=self.trainer.global_step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        for item in self.trainer.loggers:
            item.log_hyperparams(params)

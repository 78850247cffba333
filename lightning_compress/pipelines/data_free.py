"""The data-free pipeline: the calibration events without data."""

from __future__ import annotations

from typing import Any

from lightning_compress.pipelines.base import CalibrationPipeline

__all__ = ["DataFreePipeline"]


class DataFreePipeline(CalibrationPipeline):
    """Emits CALIBRATION_EPOCH_START then CALIBRATION_EPOCH_END, for data-free modifiers (RTN)."""

    name = "data_free"

    def add_batch(self, batch: Any) -> None:
        raise ValueError(
            "the data_free pipeline takes no calibration data; use pipeline='auto', "
            "'sequential' or 'basic' to calibrate on data"
        )

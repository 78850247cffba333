"""The Lightning room: Compressor callback, calibration module, oneshot, logger bridge, CLI."""

from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.compressor import (
    Compressor,
    check_compressor_resume,
    compression_loss,
)
from lightning_compress.lightning.loggers import TrainerLogger
from lightning_compress.lightning.oneshot import oneshot

__all__ = [
    "CalibrationModule",
    "Compressor",
    "TrainerLogger",
    "check_compressor_resume",
    "compression_loss",
    "oneshot",
]

"""The Lightning room: the Compressor callback and the logger bridge."""

from lightning_compress.lightning.compressor import Compressor, compression_loss
from lightning_compress.lightning.loggers import TrainerLogger

__all__ = ["Compressor", "TrainerLogger", "compression_loss"]

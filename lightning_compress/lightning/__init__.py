"""The Lightning room: the Compressor callback and the logger bridge."""

from lightning_compress.lightning.compressor import Compressor
from lightning_compress.lightning.loggers import TrainerLogger

__all__ = ["Compressor", "TrainerLogger"]

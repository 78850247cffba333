"""lightning-compress: quantize, prune and distil models with PyTorch Lightning."""

from lightning_compress.core import CompressionSession, active_session, create_session
from lightning_compress.modifiers import Modifier, QuantizationModifier
from lightning_compress.recipe import Recipe, RecipeError

__all__ = [
    "CompressionSession",
    "Modifier",
    "QuantizationModifier",
    "Recipe",
    "RecipeError",
    "active_session",
    "create_session",
]
__version__ = "0.1.0"

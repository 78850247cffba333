"""lightning-compress: quantize, prune and distil models with PyTorch Lightning."""

from lightning_compress.core import (
    CompressionSession,
    active_session,
    create_session,
    set_verbosity,
)
from lightning_compress.modifiers import Modifier, QuantizationModifier
from lightning_compress.recipe import Recipe, RecipeError

__all__ = [
    "CalibrationModule",
    "Compressor",
    "CompressionSession",
    "CompressionSummary",
    "Modifier",
    "QuantizationModifier",
    "Recipe",
    "RecipeError",
    "active_session",
    "compression_loss",
    "create_session",
    "load_compressed",
    "model_free_compress",
    "oneshot",
    "save_compressed",
    "set_verbosity",
]
__version__ = "0.1.0"

# Names from the Lightning and export rooms load lazily, so the core never pulls in
# lightning or transformers.
_LAZY_NAMES = {
    "CalibrationModule": "lightning_compress.lightning",
    "Compressor": "lightning_compress.lightning",
    "CompressionSummary": "lightning_compress.summary",
    "compression_loss": "lightning_compress.lightning",
    "oneshot": "lightning_compress.lightning",
    "load_compressed": "lightning_compress.export",
    "model_free_compress": "lightning_compress.export",
    "save_compressed": "lightning_compress.export",
}


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        import importlib

        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'lightning_compress' has no attribute '{name}'")

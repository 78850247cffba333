"""Compression algorithms as modifiers, registered by class name for recipes."""

from lightning_compress.modifiers.base import ONE_SHOT, Modifier

__all__ = ["ONE_SHOT", "Modifier"]

"""Distillation modifiers and the teacher they distil from."""

from lightning_compress.modifiers.distillation.output import (
    OutputDistillationModifier,
    distillation_term,
)
from lightning_compress.modifiers.distillation.teacher import UNCOMPRESSED, copy_as_teacher

__all__ = ["UNCOMPRESSED", "OutputDistillationModifier", "copy_as_teacher", "distillation_term"]

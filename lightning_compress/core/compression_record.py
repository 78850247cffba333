"""The record a failed calibration leaves on a model it compressed only in part."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["RECORD_ATTRIBUTE", "PartialCompression", "mark_partial", "partial_compression"]

RECORD_ATTRIBUTE = "partial_compression"
"""The model attribute that holds the record."""


@dataclass(frozen=True)
class PartialCompression:
    """What a calibration that failed after changing the model left behind.

    Blocks are compressed entirely or not at all: the blocks named in ``compressed`` hold
    their full compression state (compressed weights, scales, zero points, the quantized
    forward), every other block is as it was before the calibration.

    Args:
        compressed: the blocks whose compression finished, in order.
        blocks: how many blocks the model has (0 for a pipeline without blocks).
        at_end: whether the failure came while the modifiers compressed the layers left
            for the end of the calibration (CALIBRATION_EPOCH_END); some of those may be
            compressed.
        error: the error that stopped the calibration.
    """

    compressed: tuple[str, ...]
    blocks: int
    at_end: bool
    error: str

    def describe(self) -> str:
        """A sentence saying what is compressed and what is not.

        Returns:
            The description.
        """
        parts = []
        if self.blocks:
            names = ", ".join(self.compressed) or "none"
            parts.append(
                f"{len(self.compressed)} of {self.blocks} blocks are compressed ({names}), "
                f"the other blocks are unchanged"
            )
        if self.at_end:
            parts.append(
                "the layers compressed at the end of the calibration may be compressed in part"
            )
        return f"{'; '.join(parts)} (the calibration failed: {self.error})"


def mark_partial(model: nn.Module, record: PartialCompression) -> None:
    """Put ``record`` on ``model`` as ``model.partial_compression``.

    Args:
        model: the partly compressed model.
        record: what is compressed.
    """
    vars(model)[RECORD_ATTRIBUTE] = record


def partial_compression(model: nn.Module) -> PartialCompression | None:
    """The record a failed calibration left on ``model``, if any.

    Args:
        model: the model.

    Returns:
        The record, or None when no calibration of this model failed half way.
    """
    record = vars(model).get(RECORD_ATTRIBUTE)
    return record if isinstance(record, PartialCompression) else None

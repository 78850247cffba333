"""Per-channel magnitudes of linear layers' inputs, gathered during calibration.

SmoothQuant reads the largest ``|x_j|`` of each input channel, AWQ the mean ``|x_j|``, gathered
as :mod:`~lightning_compress.modifiers.channel_statistics` describes (computed once for layers
that read one input, padded tokens skipped, divided by ``s`` when smoothing divides the inputs
by ``s``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.channel_statistics import (
    STATISTIC_DTYPE,
    ChannelStatisticCollector,
)

__all__ = ["ChannelMagnitudeCollector"]


class ChannelMagnitudeCollector(ChannelStatisticCollector):
    """Accumulates the largest (``"max"``) or summed (``"mean"``) ``|x|`` of each input
    channel of named linear layers (see the module docstring).

    Feed it with :meth:`layer_hook` and :meth:`mask_hook`; read it, reduced across ranks, with
    :meth:`reduced` or, for layers reading the same channels, :meth:`magnitude`.

    Args:
        kind: ``"max"`` (SmoothQuant) or ``"mean"`` (AWQ).
    """

    def __init__(self, kind: Literal["max", "mean"]) -> None:
        super().__init__()
        self.kind = kind
        self.combine = "max" if kind == "max" else "sum"

    def of_rows(self, rows: Tensor) -> Tensor:
        order = float("inf") if self.kind == "max" else 1
        values = torch.linalg.vector_norm(rows, ord=order, dim=0, dtype=torch.float32)
        return values.to(STATISTIC_DTYPE)

    def magnitude(self, layers: dict[str, nn.Module]) -> Tensor:
        """The magnitude of the channels that ``layers`` all read, over all ranks.

        Args:
            layers: layers with the same input channels, by name.

        Returns:
            ``[channels]`` float32: the largest ``|x|`` over the layers (``"max"``), or the mean
            ``|x|`` over all their tokens (``"mean"``).
        """
        parts = list(self.reduced(layers).values())
        values = torch.stack([part.values for part in parts])
        if self.kind == "max":
            return values.amax(dim=0).float()
        count = sum(part.num_samples for part in parts)
        return (values.sum(dim=0) / max(count, 1)).float()

"""Wanda's input statistic: the squared L2 norm of every input channel of linear layers.

Per layer one float64 vector ``sum over tokens of x_j^2`` and a token count, gathered as
:mod:`~lightning_compress.modifiers.channel_statistics` describes (computed once for layers
that read one input, padded tokens skipped, divided by ``s^2`` when smoothing divides the
inputs by ``s``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_compress.modifiers.channel_statistics import (
    STATISTIC_DTYPE,
    ChannelStatisticCollector,
)

__all__ = ["ChannelNormCollector"]


class ChannelNormCollector(ChannelStatisticCollector):
    """Accumulates ``sum_t x_tj^2`` for each input channel ``j`` of named linear layers (its
    square root is the channel's norm)."""

    scale_power = 2

    def of_rows(self, rows: Tensor) -> Tensor:
        return rows.to(STATISTIC_DTYPE, copy=True).square_().sum(dim=0)

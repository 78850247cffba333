"""Per-input-channel statistics of linear layers, gathered during calibration.

One vector ``[in_features]`` and a token count per layer (no Hessian): Wanda's squared channel
norms, SmoothQuant's largest and AWQ's mean ``|x|``. Layers that read the same input one after
another (``q/k/v_proj``, ``gate/up_proj``) compute it once: the next reader of the same,
unchanged tensor folds in the vector already computed. Padded tokens are skipped when the
attention mask is visible (see :class:`~lightning_compress.modifiers.layerwise.TokenMaskTracker`).
When smoothing divides a layer's inputs by ``s > 0`` after they were observed, its statistic is
divided by ``s`` to the statistic's power (:mod:`~lightning_compress.modifiers.input_scaling`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_sum_
from lightning_compress.core.tensors import same_input, tensor_version
from lightning_compress.modifiers.layerwise import StatisticsCollector

__all__ = ["STATISTIC_DTYPE", "ChannelStatistic", "ChannelStatisticCollector"]

STATISTIC_DTYPE = torch.float64
"""Accumulation dtype: sums over differently sharded data agree to far below float32 rounding."""


@dataclass
class ChannelStatistic:
    """A layer's per-channel input statistic over the tokens it saw.

    Args:
        values: ``[in_features]``, float64.
        num_samples: the tokens seen.
    """

    values: Tensor
    num_samples: int = 0


@dataclass
class _Read:
    """The latest layer input and its statistic."""

    tensor: Tensor
    version: int
    values: Tensor
    num_samples: int

    def matches(self, x: Tensor) -> bool:
        return same_input(self.tensor, x) and tensor_version(x) == self.version


class ChannelStatisticCollector(StatisticsCollector):
    """Accumulates one statistic per input channel of named linear layers.

    Subclasses give :meth:`of_rows` (a batch's statistic), :attr:`combine` (how batches and
    ranks combine) and :attr:`scale_power` (how the statistic follows rescaled inputs). Feed
    one with :meth:`layer_hook` and :meth:`mask_hook`; read it, reduced across ranks, with
    :meth:`reduced`.
    """

    combine: Literal["sum", "max"] = "sum"
    """Batches and ranks combine by sum, or by elementwise maximum."""
    scale_power: int = 1
    """Inputs divided by ``s`` divide the statistic by ``s ** scale_power``."""

    def __init__(self) -> None:
        super().__init__()
        self._statistics: dict[str, ChannelStatistic] = {}
        self._read: _Read | None = None

    def of_rows(self, rows: Tensor) -> Tensor:
        """The statistic of one input's real tokens.

        Args:
            rows: ``[tokens, in_features]``.

        Returns:
            ``[in_features]`` in :data:`STATISTIC_DTYPE`.
        """
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, name: str, x: Tensor) -> None:
        """Folds the statistic of ``x`` (real tokens only) into layer ``name``'s.

        Args:
            name: the layer's name.
            x: its input ``[..., in_features]``.
        """
        if self._read is None or not self._read.matches(x):
            rows = self.real_rows(x)
            self._read = _Read(x, tensor_version(x), self.of_rows(rows), rows.shape[0])
            self.num_reads += 1
        read = self._read
        statistic = self._statistics.get(name)
        if statistic is None:
            self._statistics[name] = ChannelStatistic(read.values.clone(), read.num_samples)
            return
        values = read.values.to(statistic.values.device)
        if self.combine == "max":
            torch.maximum(statistic.values, values, out=statistic.values)
        else:
            statistic.values += values
        statistic.num_samples += read.num_samples

    def reduced(self, layers: dict[str, nn.Module]) -> dict[str, ChannelStatistic]:
        """Every layer's statistic over all ranks (one reduction for all of them).

        Every rank must call this with the same layers in the same order. Layers that read
        nothing get zeros (``num_samples == 0``).

        Args:
            layers: the ``nn.Linear`` layers, by name.

        Returns:
            The reduced statistics, by name (new objects; the collector's own are unchanged).
        """
        self._read = None
        if not layers:
            return {}
        device = next(iter(layers.values())).weight.device
        widths = [layer.in_features for layer in layers.values()]
        parts = [
            self._statistics.get(name, ChannelStatistic(torch.zeros(width)))
            for name, width in zip(layers, widths, strict=True)
        ]
        values = torch.cat([part.values.to(device=device, dtype=STATISTIC_DTYPE) for part in parts])
        counts = torch.tensor([part.num_samples for part in parts], dtype=torch.int64)
        (all_reduce_max_ if self.combine == "max" else all_reduce_sum_)(values)
        all_reduce_sum_(counts)
        return {
            name: ChannelStatistic(part, int(count))
            for name, part, count in zip(layers, values.split(widths), counts.tolist(), strict=True)
        }

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Divides the statistics of ``names`` by ``scale ** scale_power``, for inputs now
        ``x / scale``.

        Args:
            names: the layers whose inputs were divided by ``scale``.
            scale: ``[in_features]``, positive.
        """
        self._read = None
        for name in names:
            statistic = self._statistics.get(name)
            if statistic is not None:
                statistic.values.div_(scale.to(statistic.values) ** self.scale_power)

    def discard(self, names: Iterable[str]) -> None:
        """Frees the statistics of ``names``.

        Args:
            names: the layers.
        """
        self._read = None
        for name in names:
            self._statistics.pop(name, None)

    def clear(self) -> None:
        """Frees every layer's statistic, the latest input and mask; stops following input
        scaling."""
        super().clear()
        self._statistics.clear()
        self._read = None

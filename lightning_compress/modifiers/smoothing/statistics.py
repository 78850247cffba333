"""Per-channel magnitudes of linear layers' inputs, gathered during calibration.

SmoothQuant reads the largest ``|x_j|`` of each input channel, AWQ the mean ``|x_j|``. Layers
that read the same input one after another (``q/k/v_proj``) compute it once; padded tokens are
skipped when the attention mask is visible (see
:class:`~lightning_compress.modifiers.layerwise.TokenMaskTracker`); when smoothing divides a
layer's inputs by ``s > 0`` after they were observed, its magnitudes are divided by ``s``
(:mod:`~lightning_compress.modifiers.input_scaling`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_sum_
from lightning_compress.modifiers.hessian_collector import same_input, tensor_version
from lightning_compress.modifiers.layerwise import StatisticsCollector
from lightning_compress.modifiers.smoothing.folding import linear_weight

__all__ = ["ChannelMagnitudeCollector", "ChannelMagnitudes"]

MAGNITUDE_DTYPE = torch.float64
"""Accumulation dtype: sums over differently sharded data agree to far below float32 rounding."""


@dataclass
class ChannelMagnitudes:
    """A layer's per-channel input magnitudes over the tokens it saw.

    Args:
        values: ``[in_features]``: ``max_t |x_tj|`` (``"max"``) or ``sum_t |x_tj|``
            (``"mean"``), float64.
        num_samples: the tokens seen.
    """

    values: Tensor
    num_samples: int = 0


@dataclass
class _Read:
    """The latest layer input and its per-channel magnitudes."""

    tensor: Tensor
    version: int
    values: Tensor
    num_samples: int

    def matches(self, x: Tensor) -> bool:
        return same_input(self.tensor, x) and tensor_version(x) == self.version


class ChannelMagnitudeCollector(StatisticsCollector):
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
        self._magnitudes: dict[str, ChannelMagnitudes] = {}
        self._read: _Read | None = None

    @torch.no_grad()
    def observe(self, name: str, x: Tensor) -> None:
        """Folds the magnitudes of ``x`` (real tokens only) into layer ``name``'s.

        Args:
            name: the layer's name.
            x: its input ``[..., in_features]``.
        """
        if self._read is None or not self._read.matches(x):
            rows = self.real_rows(x)
            order = float("inf") if self.kind == "max" else 1
            values = torch.linalg.vector_norm(rows, ord=order, dim=0, dtype=torch.float32)
            self._read = _Read(x, tensor_version(x), values.to(MAGNITUDE_DTYPE), rows.shape[0])
            self.num_reads += 1
        read = self._read
        magnitudes = self._magnitudes.get(name)
        if magnitudes is None:
            self._magnitudes[name] = ChannelMagnitudes(read.values.clone(), read.num_samples)
            return
        values = read.values.to(magnitudes.values.device)
        if self.kind == "max":
            torch.maximum(magnitudes.values, values, out=magnitudes.values)
        else:
            magnitudes.values += values
        magnitudes.num_samples += read.num_samples

    def reduced(self, layers: dict[str, nn.Module]) -> dict[str, ChannelMagnitudes]:
        """Every layer's magnitudes over all ranks (maximum or sum; one reduction for all).

        Every rank must call this with the same layers in the same order. Layers that read
        nothing get zeros (``num_samples == 0``).

        Args:
            layers: the layers, by name.

        Returns:
            The reduced magnitudes, by name (new objects).
        """
        self._read = None
        device = next(iter(layers.values())).weight.device
        widths = [linear_weight(layer).shape[1] for layer in layers.values()]
        parts = [
            self._magnitudes.get(name, ChannelMagnitudes(torch.zeros(width)))
            for name, width in zip(layers, widths, strict=True)
        ]
        values = torch.cat([part.values.to(device=device, dtype=MAGNITUDE_DTYPE) for part in parts])
        counts = torch.tensor([part.num_samples for part in parts], dtype=torch.int64)
        (all_reduce_max_ if self.kind == "max" else all_reduce_sum_)(values)
        all_reduce_sum_(counts)
        return {
            name: ChannelMagnitudes(part, int(count))
            for name, part, count in zip(layers, values.split(widths), counts.tolist(), strict=True)
        }

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

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Divides the magnitudes of ``names`` by ``scale``, for inputs now ``x / scale``.

        Args:
            names: the layers whose inputs were divided by ``scale``.
            scale: ``[in_features]``, positive.
        """
        self._read = None
        for name in names:
            magnitudes = self._magnitudes.get(name)
            if magnitudes is not None:
                magnitudes.values.div_(scale.to(magnitudes.values))

    def discard(self, names: Iterable[str]) -> None:
        """Frees the magnitudes of ``names``.

        Args:
            names: the layers.
        """
        self._read = None
        for name in names:
            self._magnitudes.pop(name, None)

    def clear(self) -> None:
        """Frees every layer's magnitudes, the latest input and mask; stops following input
        scaling."""
        super().clear()
        self._magnitudes.clear()
        self._read = None

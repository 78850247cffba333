"""Collecting the squared L2 norm of every input channel of linear layers, for Wanda.

Per layer this is one float64 vector ``[in_features]``, ``sum over tokens of x_j^2``, and a
token count: no Hessian. Layers that read the same input one after another (``q/k/v_proj``,
``gate/up_proj``) compute it once: the next reader of the same, unchanged tensor adds the
vector already computed. Padded tokens are skipped when the attention mask is visible
(see :class:`~lightning_compress.modifiers.layerwise.TokenMaskTracker`). When
smoothing divides a layer's inputs by ``s`` after they were observed, its sums are divided
by ``s^2`` (:mod:`~lightning_compress.modifiers.input_scaling`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.modifiers.hessian_collector import same_input, tensor_version
from lightning_compress.modifiers.layerwise import StatisticsCollector

__all__ = ["ChannelNormCollector", "ChannelNorms"]

NORM_DTYPE = torch.float64
"""Accumulation dtype: sums over differently sharded data agree to far below float32 rounding."""


@dataclass
class ChannelNorms:
    """The squared norms of a layer's input channels over the tokens it saw.

    Args:
        sum_squares: ``[in_features]``, ``sum_t x_tj^2`` (float64).
        num_samples: the tokens summed.
    """

    sum_squares: Tensor
    num_samples: int = 0

    def norms(self) -> Tensor:
        """Returns ``||x_j||_2`` over the tokens, ``[in_features]``."""
        return self.sum_squares.sqrt()


@dataclass
class _Read:
    """The latest layer input and its per-channel sum of squares."""

    tensor: Tensor
    version: int
    sum_squares: Tensor
    num_samples: int

    def matches(self, x: Tensor) -> bool:
        return same_input(self.tensor, x) and tensor_version(x) == self.version


class ChannelNormCollector(StatisticsCollector):
    """Accumulates the squared input-channel norms of named linear layers.

    Feed it with :meth:`layer_hook` (a forward pre-hook per layer) and :meth:`mask_hook`
    (forward pre-hooks with kwargs on ``hessian_collector.mask_sources``); read the norms,
    summed across ranks, with :meth:`reduced`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._norms: dict[str, ChannelNorms] = {}
        self._read: _Read | None = None

    @torch.no_grad()
    def observe(self, name: str, x: Tensor) -> None:
        """Adds the squared channel norms of ``x`` (real tokens only) to layer ``name``'s.

        Args:
            name: the layer's name.
            x: its input ``[..., in_features]``.
        """
        if self._read is None or not self._read.matches(x):
            rows = self.real_rows(x)
            sum_squares = rows.to(NORM_DTYPE, copy=True).square_().sum(dim=0)
            self._read = _Read(x, tensor_version(x), sum_squares, rows.shape[0])
            self.num_reads += 1
        norms = self._norms.get(name)
        if norms is None:
            self._norms[name] = ChannelNorms(self._read.sum_squares.clone(), self._read.num_samples)
        else:
            norms.sum_squares += self._read.sum_squares
            norms.num_samples += self._read.num_samples

    def reduced(self, layers: dict[str, nn.Linear]) -> dict[str, ChannelNorms]:
        """Every layer's norms, summed over all ranks (one reduction for all of them).

        Every rank must call this with the same layers in the same order. Layers that read
        nothing get zeros (``num_samples == 0``).

        Args:
            layers: the layers, by name.

        Returns:
            The reduced norms, by name (new objects; the collector's own are unchanged).
        """
        self._read = None
        if not layers:
            return {}
        device = next(iter(layers.values())).weight.device
        parts = [
            self._norms.get(name, ChannelNorms(layer.weight.new_zeros(layer.in_features)))
            for name, layer in layers.items()
        ]
        sums = torch.cat([part.sum_squares.to(device=device, dtype=NORM_DTYPE) for part in parts])
        counts = torch.tensor([part.num_samples for part in parts], dtype=torch.int64)
        all_reduce_sum_(sums)
        all_reduce_sum_(counts)
        widths = [layer.in_features for layer in layers.values()]
        return {
            name: ChannelNorms(sum_squares, int(count))
            for name, sum_squares, count in zip(
                layers, sums.split(widths), counts.tolist(), strict=True
            )
        }

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Divides the sums of squares of ``names`` by ``scale^2``, for inputs now ``x / scale``.

        Args:
            names: the layers whose inputs were divided by ``scale``.
            scale: ``[in_features]``.
        """
        self._read = None
        for name in names:
            norms = self._norms.get(name)
            if norms is not None:
                norms.sum_squares.div_(scale.to(norms.sum_squares).square())

    def discard(self, names: Iterable[str]) -> None:
        """Frees the norms of ``names``.

        Args:
            names: the layers.
        """
        for name in names:
            self._norms.pop(name, None)

    def clear(self) -> None:
        """Frees every layer's norms, the latest input and mask; stops following input scaling."""
        super().clear()
        self._norms.clear()
        self._read = None

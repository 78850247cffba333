"""Per-expert Hessians weighted by the router: AWQ's loss on a mixture's output.

A mixture of experts adds, for each token ``t``, the outputs of the experts it is routed to,
each times its router weight ``w_te``. The error a quantized expert layer adds there is
``w_te dW x_t`` (the down projection's reaches the block's output as is; the gate and up
projections' are measured at their outputs, like every AWQ balance layer), so over the ``n``
real tokens the mixture saw, the mean squared error is ``tr(dW H dW^T) / 2`` with

    ``H = (2 / n) sum_{t routed to the expert} w_te^2 x_t x_t^T``.

:class:`RoutedHessians` gathers this ``H`` for the layers of
:class:`~lightning_compress.layers.experts.LinearExperts`: from each layer's input it takes the
rows of the tokens routed to its expert (all tokens are there when every expert calibrates on
every token, only those otherwise), times their router weights. Padded tokens are left out
where the attention mask is visible; sums run in float64 and are summed across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.layers.experts import LinearExperts
from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise import TokenMaskTracker

__all__ = ["RoutedHessians"]

_DTYPE = torch.float64


class RoutedHessians:
    """Router-weighted Hessians of the expert layers among ``layers`` (see the module docstring).

    Register :meth:`experts_hook` (forward pre-hook) on each module of :attr:`mixtures`,
    :meth:`layer_hook` on each layer of :attr:`names`, and :attr:`masks`' hook on the modules
    taking the attention mask; read the Hessians with :meth:`reduced`.

    Args:
        model: the model.
        layers: linear layers by name; those inside a ``LinearExperts`` are followed.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        self.masks = TokenMaskTracker()
        self._where: dict[str, tuple[LinearExperts, int]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, LinearExperts):
                continue
            for index, expert in enumerate(module.experts()):
                for child, layer in expert.named_children():
                    if layers.get(f"{name}.{index}.{child}") is layer:
                        self._where[f"{name}.{index}.{child}"] = (module, index)
        self._routing: dict[LinearExperts, tuple[Tensor, Tensor, Tensor | None]] = {}
        self._tokens: dict[LinearExperts, int] = {}
        self._sums: dict[str, HessianAccumulator] = {}

    @property
    def names(self) -> list[str]:
        """The expert layers followed."""
        return list(self._where)

    @property
    def mixtures(self) -> list[LinearExperts]:
        """The experts modules holding them."""
        return list(dict.fromkeys(module for module, _ in self._where.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def experts_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Remembers the routing of a ``LinearExperts`` call and counts its real tokens.

        Args:
            module: the experts module.
            args: ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.
        """
        hidden, index, weights = args[:3]
        mask = self.masks.current
        real = None
        if mask is not None and mask.numel() == hidden.shape[0]:
            real = mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)
        self._routing[module] = (index, weights, real)
        count = hidden.shape[0] if real is None else int(real.sum())
        self._tokens[module] = self._tokens.get(module, 0) + count

    def layer_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """The forward pre-hook folding layer ``name``'s routed, weighted input into its sum.

        Args:
            name: one of :attr:`names`.

        Returns:
            The hook.
        """
        mixture, expert = self._where[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            index, weights, real = self._routing[mixture]
            tokens, slots = torch.where(index == expert)
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            if rows.shape[0] != tokens.numel():  # the expert ran on every token
                rows = rows[tokens]
            factors = weights[tokens, slots].detach()
            if real is not None:
                keep = real[tokens]
                rows, factors = rows[keep], factors[keep]
            dtype = torch.promote_types(rows.dtype, torch.float32)
            accumulator = self._sums.get(name)
            if accumulator is None:
                accumulator = HessianAccumulator(rows.shape[-1], _DTYPE, rows.device)
                self._sums[name] = accumulator
            accumulator.add(rows.to(dtype) * factors.to(dtype)[:, None])

        return hook

    def reduced(self, layers: dict[str, nn.Module]) -> dict[str, Tensor]:
        """The Hessians of expert layers, over all ranks (same layers, same order on each).

        Args:
            layers: some of :attr:`names`, with their modules.

        Returns:
            ``H`` ``[in, in]`` float64 by name (zeros for a layer that no token reached).
        """
        result = {}
        for name, layer in layers.items():
            mixture, _ = self._where[name]
            mine = self._sums.get(name)
            device = layer.weight.device if mine is None else mine.device
            total = HessianAccumulator(layer.weight.shape[1], _DTYPE, device)
            if mine is not None:
                total.merge(mine)  # a copy: the sum itself stays this rank's
            total.reduce_over_ranks_()
            tokens = torch.tensor([self._tokens.get(mixture, 0)], device=device)
            result[name] = total.hessian(samples=int(all_reduce_sum_(tokens).item()))
        return result

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Makes the Hessians of ``names`` those of inputs divided by ``scale``.

        Args:
            names: layers whose inputs are now ``x / scale``.
            scale: ``[in_features]``.
        """
        for name in names:
            if name in self._sums:
                self._sums[name].scale_inputs_(1 / scale.to(_DTYPE))

    def discard(self, names: Iterable[str]) -> None:
        """Frees the sums of ``names``.

        Args:
            names: layers.
        """
        for name in names:
            self._sums.pop(name, None)

    def clear(self) -> None:
        """Frees every sum and the routing remembered."""
        self._sums.clear()
        self._routing.clear()
        self._tokens.clear()

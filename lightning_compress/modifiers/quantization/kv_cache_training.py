"""Quantization-aware training of attention states: the KV cache (and queries) observed and
fake-quantized on every training forward, with the one-shot numerics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_min_
from lightning_compress.core.recomputation import recomputing
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.kv_cache import (
    ATTENTION_SCHEME_ATTRIBUTE,
    AttentionScheme,
    PlannedAttention,
)
from lightning_compress.modifiers.quantization.kv_cache_math import (
    fake_quantize_states,
    head_major,
    state_heads,
    state_observer,
    state_scale,
)

__all__ = ["RANGE_BUFFERS", "AttentionTraining"]

RANGE_BUFFERS = ("min_vals", "max_vals")
"""Suffixes of the buffers (``k_min_vals`` ...) holding a state's observed range in training."""


class AttentionTraining(PlannedAttention):
    """Quantization-aware training of the attention modules' states, with one-shot numerics.

    Created at ``initialize``: every module gets its ``<role>_scale`` and range buffers
    (``<role>_min_vals`` / ``<role>_max_vals``, NaN until observed), so a checkpoint loads
    strictly into a freshly set-up model. From ``start`` the attention is routed
    (:class:`AttentionRouting`): in training mode, until ``frozen``, each forward folds the
    states' range (reduced across ranks) into the buffers and recomputes the scales
    (``max|x| / 448``, running or moving-average extremes, or the extremes of each batch's
    MSE-shrunk range, searched on each rank's batch, as the observer says), then the states
    are fake-quantized with a straight-through gradient; in eval mode they are quantized with
    the current scales (not before anything was observed). ``end`` drops the range buffers and
    keeps the scales and the ``attention_scheme``; ``close`` removes the routing, ``undo``
    everything this added.

    Args:
        modifier: the modifier that owns the buffers.
        plan: attention module name to ``(module, scheme)``.
    """

    def __init__(
        self, modifier: Any, plan: Mapping[str, tuple[nn.Module, AttentionScheme]]
    ) -> None:
        super().__init__(modifier, plan)
        self._schemes = {module: scheme for module, scheme in self._plan.values()}
        self._ended = False
        self.frozen = False
        for module, scheme in self._plan.values():
            dtype = next(module.parameters()).dtype
            for role, args in scheme.roles().items():
                per_head = args.strategy == "attn_head"
                heads = state_heads(module, role) if per_head else 1
                nan = torch.full((heads, 1) if per_head else (1,), torch.nan, dtype=dtype)
                for suffix in RANGE_BUFFERS:
                    modifier.add_buffer(module, f"{role}_{suffix}", nan.clone())
                scale = nan.reshape(-1, 1, 1) if per_head else nan
                modifier.add_buffer(module, f"{role}_scale", scale.clone())

    def start(self) -> None:
        """Routes the attention and records each module's ``attention_scheme``.

        Raises:
            ValueError: naming the modules whose attention cannot be routed.
        """
        self._route()
        for module, scheme in self._schemes.items():
            setattr(module, ATTENTION_SCHEME_ATTRIBUTE, scheme)

    def end(self) -> None:
        """Drops the range buffers; the scales and schemes stay (an abort keeps them)."""
        for module, scheme in self._schemes.items():
            for role in scheme.roles():
                for suffix in RANGE_BUFFERS:
                    module._buffers.pop(f"{role}_{suffix}", None)
            self._modifier.keep_buffers(module)
        self._ended = True
        self.frozen = True

    def undo(self) -> None:
        """Removes the routing and, before ``end``, the schemes (the modifier removes the
        buffers it did not keep); after ``end`` the modules stay quantized."""
        self.close()
        if self._ended:
            return
        for module in self._schemes:
            vars(module).pop(ATTENTION_SCHEME_ATTRIBUTE, None)

    def _handle(
        self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        states = {"q": query, "k": key, "v": value}
        for role, args in self._schemes[module].roles().items():
            if module.training and not self.frozen and not recomputing():
                self._observe(module, role, args, states[role])
            scale = getattr(module, f"{role}_scale")
            if not bool(torch.isnan(scale).any()):
                states[role] = fake_quantize_states(states[role], scale, args)
        return states["q"], states["k"], states["v"]

    @torch.no_grad()
    def _observe(self, module: nn.Module, role: str, args: QuantizationArgs, x: Tensor) -> None:
        low, high = (getattr(module, f"{role}_{suffix}") for suffix in RANGE_BUFFERS)
        observer = state_observer(role, args).observer
        if not bool(torch.isnan(low).any()):
            observer.min_vals, observer.max_vals = low.to(x.dtype), high.to(x.dtype)
        # Under DDP every rank folds in the range of the global batch: equal scales on all ranks.
        batch_min, batch_max = observer.batch_range(head_major(x.detach(), args)[0])
        observer.update_range(all_reduce_min_(batch_min), all_reduce_max_(batch_max))
        low.copy_(observer.min_vals)
        high.copy_(observer.max_vals)
        getattr(module, f"{role}_scale").copy_(state_scale(observer, args, low.dtype))

"""Collecting the input Hessians of linear layers during calibration, for GPTQ and SparseGPT.

Layers that read the same input (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``)
share one :class:`~lightning_compress.modifiers.hessian.HessianAccumulator`, so each distinct
input is folded in once per forward. Sharing is found, not configured: consecutive layer calls
whose input is the same tensor (the same object, or a view of the same memory with the same
shape, strides and dtype, unchanged in between) form one *read*. When a read ends (a layer
reads another input), the layers that took part in it are grouped on their first read, and on
every later read each group is checked to have read it in full; a group that did not is split
in two (each part keeps a copy of the common history), so every layer's Hessian is always
exactly the one of the inputs it saw.

Padding is skipped when the attention mask is visible: forward pre-hooks on the layers'
ancestors whose ``forward`` takes an ``attention_mask`` record it
(:class:`~lightning_compress.modifiers.layerwise.TokenMaskTracker`), and it is applied to the
layer inputs whose leading dimensions are ``[batch, seq]``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import Tensor, nn

from lightning_compress.core.distributed import (
    all_reduce_max_,
    all_reduce_min_,
    is_distributed,
)
from lightning_compress.core.tensors import same_input, tensor_version
from lightning_compress.modifiers.hessian import HessianAccumulator, HessianWorkspace
from lightning_compress.modifiers.layerwise import StatisticsCollector

__all__ = ["HessianCollector", "mask_sources"]

_WORKSPACE = HessianWorkspace()
"""The workspace of every collector in this process (their solves run one at a time): one
buffer even when several methods (SparseGPT, then GPTQ) calibrate together. Clearing any
collector frees it (a later solve makes it again)."""

HESSIAN_DTYPE = torch.float64
"""Accumulation dtype: sums over differently sharded data then agree to far below float32
rounding, so a multi-process run quantizes exactly like one process."""


@dataclass
class _Group:
    """Layers whose inputs have been the same in every forward so far, and their Hessian."""

    accumulator: HessianAccumulator
    names: set[str]


@dataclass
class _Read:
    """One input tensor and the layers that read it, one after another."""

    tensor: Tensor
    version: int
    mask: Tensor | None
    readers: list[str] = field(default_factory=list)

    def accepts(self, name: str, x: Tensor) -> bool:
        """Whether ``name`` reading ``x`` continues this read."""
        if name in self.readers or not same_input(self.tensor, x):
            return False
        return tensor_version(x) == self.version


class HessianCollector(StatisticsCollector):
    """Accumulates the input Hessians of named linear layers, shared between layers that read
    the same input (see the module docstring).

    Feed it with :meth:`layer_hook` (a forward pre-hook per layer) and :meth:`mask_hook`
    (forward pre-hooks with kwargs on :func:`mask_sources`); read the Hessians, reduced
    across ranks, with :meth:`reduced`.

    Args:
        offload: keep the Hessians on the CPU (each batch's product is still computed on the
            input's device).
    """

    def __init__(self, offload: bool = False) -> None:
        super().__init__()
        self.offload = offload
        self.workspace = _WORKSPACE
        """Where the solves make their Hessians: shared by the collectors of this process,
        freed when one is cleared."""
        self._groups: dict[str, _Group] = {}
        self._read: _Read | None = None

    def observe(self, name: str, x: Tensor) -> None:
        """Records that layer ``name`` read ``x``.

        Args:
            name: the layer's name.
            x: its input ``[..., in_features]``.
        """
        if self._read is not None and self._read.accepts(name, x):
            self._read.readers.append(name)
            return
        self.commit()
        self._read = _Read(x.detach(), tensor_version(x), self.masks.mask_for(x), [name])

    def commit(self) -> None:
        """Folds the current read into the Hessians of its readers.

        Raises:
            RuntimeError: when the input was modified in place after a layer read it.
        """
        read, self._read = self._read, None
        if read is None:
            return
        if tensor_version(read.tensor) != read.version:
            raise RuntimeError(
                f"the input of {read.readers} was modified in place after the layer read it; "
                "the Hessian needs the input as the layer saw it"
            )
        self.num_reads += 1
        for accumulator in self._accumulators_of(read):
            accumulator.add(read.tensor, read.mask)

    def reduced(self, layers: dict[str, nn.Linear]) -> dict[str, HessianAccumulator]:
        """Every layer's Hessian, summed over all ranks.

        Every rank must call this with the same layers in the same order. Layers that read
        nothing get an empty accumulator (``num_samples == 0``).

        Args:
            layers: the layers, by name.

        Returns:
            The reduced accumulators, by name (layers sharing an input share one).
        """
        self.commit()
        for group in _distinct_groups(self._groups.get(name) for name in layers):
            self._split(group, set(layers))  # a reduced Hessian is used by these layers only
        accumulators = {
            name: self._groups[name].accumulator if name in self._groups else self._empty(layer)
            for name, layer in layers.items()
        }
        if not is_distributed():  # one process: its sums are the totals
            return accumulators
        if not _sharing_agrees(list(accumulators.values())):
            accumulators = {name: copy.deepcopy(acc) for name, acc in accumulators.items()}
        for accumulator in _distinct(accumulators.values()):
            accumulator.reduce_over_ranks_()
        return accumulators

    def discard(self, names: Iterable[str]) -> None:
        """Frees the Hessians of ``names`` (shared ones once no layer uses them).

        Args:
            names: the layers.
        """
        for name in names:
            group = self._groups.pop(name, None)
            if group is not None:
                group.names.discard(name)

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Rescales the Hessians of ``names`` for inputs that are now ``x / scale``.

        They become ``diag(1/s) H diag(1/s)``. The current read is folded in first. A Hessian
        shared with layers outside ``names`` is split, so each accumulator is rescaled once and
        only for the layers it belongs to.

        Args:
            names: the layers whose inputs were divided by ``scale``.
            scale: ``[in_features]``.
        """
        self.commit()
        inverse = 1 / scale.to(HESSIAN_DTYPE)
        for group in _distinct_groups(self._groups.get(name) for name in names):
            self._split(group, set(names)).accumulator.scale_inputs_(inverse)

    def clear(self) -> None:
        """Frees every Hessian, the workspace and the current read, and stops following input
        scaling."""
        super().clear()
        self._groups.clear()
        self._read = None
        self.workspace.release()

    def _accumulators_of(self, read: _Read) -> list[HessianAccumulator]:
        """The accumulators ``read`` goes into: one per group of readers, created or split so
        that each is used by readers only."""
        readers = set(read.readers)
        accumulators = []
        for group in _distinct_groups(self._groups.get(name) for name in read.readers):
            if group.names - readers:
                logger.debug(
                    "{} and {} no longer read the same input; their Hessians continue apart",
                    sorted(group.names & readers),
                    sorted(group.names - readers),
                )
            accumulators.append(self._split(group, readers).accumulator)
        new = readers - self._groups.keys()
        if new:
            in_features = read.tensor.shape[-1]
            device = "cpu" if self.offload else read.tensor.device
            group = _Group(HessianAccumulator(in_features, HESSIAN_DTYPE, device), new)
            self._groups.update(dict.fromkeys(new, group))
            accumulators.append(group.accumulator)
        return accumulators

    def _split(self, group: _Group, keep: set[str]) -> _Group:
        """``group`` cut down to ``keep``; the rest continues on a copy of its Hessian."""
        outside = group.names - keep
        if outside:
            rest = _Group(copy.deepcopy(group.accumulator), outside)
            self._groups.update(dict.fromkeys(outside, rest))
            group.names -= outside
        return group

    def _empty(self, layer: nn.Linear) -> HessianAccumulator:
        device = "cpu" if self.offload else layer.weight.device
        return HessianAccumulator(layer.in_features, HESSIAN_DTYPE, device)


def mask_sources(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The ancestors of the layers ``names`` whose ``forward`` takes an ``attention_mask``.

    Args:
        model: the model.
        names: module names of layers inside it.

    Returns:
        The modules, outermost first, each once.
    """
    prefixes = {""}
    for name in names:
        parts = name.split(".")
        prefixes.update(".".join(parts[:end]) for end in range(1, len(parts)))
    modules = {id(m): m for m in map(model.get_submodule, sorted(prefixes, key=len))}
    return [module for module in modules.values() if _takes_mask(module)]


def _takes_mask(module: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _distinct(accumulators: Iterable[HessianAccumulator]) -> list[HessianAccumulator]:
    return list({id(acc): acc for acc in accumulators}.values())


def _distinct_groups(groups: Iterable[_Group | None]) -> list[_Group]:
    return list({id(group): group for group in groups if group is not None}.values())


def _sharing_agrees(accumulators: list[HessianAccumulator]) -> bool:
    """Whether every rank shares the accumulators between the same layers (then one reduction
    per shared accumulator gives every layer's sum)."""
    if not accumulators:
        return True
    first = {}
    owners = [first.setdefault(id(acc), index) for index, acc in enumerate(accumulators)]
    low = all_reduce_min_(torch.tensor(owners, dtype=torch.long))
    high = all_reduce_max_(torch.tensor(owners, dtype=torch.long))
    return bool(torch.equal(low, high))

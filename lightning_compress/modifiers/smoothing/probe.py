"""Numerical probes: run a block again on recorded calibration inputs and watch its layers.

Smoothing is exact only where the smooth layer's channels reach the balance layers linearly
and channel for channel, and only if no other module reads them. Both are checked on the
data instead of assumed from names:

* :meth:`BlockProbe.baseline` runs the block once, recording which layers read the output of
  a normalization layer directly (:func:`reads_rows`: the same tensor, a view of it, or rows
  gathered from it, as a mixture's experts read the tokens routed to them);
* :meth:`BlockProbe.reached` multiplies a few output channels of a smooth layer by
  ``PROBE_FACTOR`` and tells which layers see exactly those input channels multiplied by it
  and every other channel unchanged;
* :meth:`BlockProbe.scales_exactly` tells whether multiplying a normalization layer's weight
  multiplies its output (not so for ``x * (1 + w)``);
* :meth:`BlockProbe.preserves_output` applies smoothings with ``s = PROBE_FACTOR`` and tells
  whether the block's output is unchanged.

``PROBE_FACTOR = -2``: a power of two, so scaling is exact in every floating-point format
and an exactly linear path reproduces it bit for bit; negative, so a positively homogeneous
non-linearity such as ReLU (``relu(2x) = 2 relu(x)``) fails. Weights are restored bit for bit
after each probe, and the hooks of every modifier are off while the block runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from lightning_compress.core.tensors import same_input
from lightning_compress.layers.experts import LinearExperts
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.smoothing.calls import RecordedCall, tensors_in
from lightning_compress.modifiers.smoothing.folding import (
    SmoothingMapping,
    apply_smoothing,
    output_width,
    scale_outputs,
)

__all__ = ["PROBE_FACTOR", "TOLERANCE", "Baseline", "BlockProbe", "reads_rows"]

PROBE_FACTOR = -2.0
TOLERANCE = 1e-3
"""Relative error (in norm) under which a probed tensor counts as equal to the expectation;
exact paths give 0 or rounding noise, non-linear ones errors of order 1."""
PROBED_CHANNELS = 8
"""How many output channels of a smooth layer the reach probe multiplies."""


@dataclass
class Baseline:
    """What one unchanged run of the block showed.

    Args:
        inputs: the first input of each watched layer, in the order they ran.
        readers: for each watched normalization layer, the watched layers reading its output.
        norm_outputs: the output of each watched normalization layer.
        output: the block's output tensors.
    """

    inputs: dict[nn.Module, Tensor] = field(default_factory=dict)
    readers: dict[nn.Module, list[nn.Module]] = field(default_factory=dict)
    norm_outputs: dict[nn.Module, Tensor] = field(default_factory=dict)
    output: list[Tensor] = field(default_factory=list)


class _Stop(Exception):
    """Raised inside the block once every awaited layer has read its input."""


class BlockProbe:
    """Runs ``block`` again on a recorded call, with changes applied to its weights.

    The block runs on the call's first sample only (:meth:`RecordedCall.first_sample`), or on
    the whole call where the block refuses the narrowed arguments.

    Args:
        block: the block (a decoder layer, or the whole model).
        call: one recorded calibration call of ``block``.
    """

    def __init__(self, block: nn.Module, call: RecordedCall) -> None:
        self.block = block
        self._full_call = call
        self.call = call.first_sample()

    def baseline(self, linears: Iterable[nn.Module], norms: Iterable[nn.Module]) -> Baseline:
        """Runs the block unchanged.

        Args:
            linears: the layers to watch (linear layers, and modules that may read their input
                through a weight matrix).
            norms: the normalization layers whose readers to find.

        Returns:
            The inputs of the watched layers, the readers and output of each norm, the block's
            output.
        """
        linears, norms = list(linears), list(norms)
        try:
            return self._baseline(linears, norms)
        except Exception as err:
            if self.call is self._full_call:
                raise
            logger.debug("probing {} on the whole batch: {}", type(self.block).__name__, err)
            self.call = self._full_call
            return self._baseline(linears, norms)

    def _baseline(self, linears: list[nn.Module], norms: list[nn.Module]) -> Baseline:
        baseline = Baseline(readers={norm: [] for norm in norms})
        latest = baseline.norm_outputs
        indexes: dict[nn.Module, _RowIndex] = {}

        def keep_output(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                latest.pop(module, None)  # the latest norm to run comes last
                latest[module] = output
                indexes[module] = _RowIndex(output)

        def read(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor) or module in baseline.inputs:
                return
            x = baseline.inputs[module] = args[0]
            # the norm whose very output this is; else the latest whose rows it holds (two
            # norms of one input, as GPT-NeoX's, may give equal values)
            sources = [norm for norm, output in latest.items() if _same_memory(output, x)]
            if not sources:
                sources = [norm for norm in latest if indexes[norm].holds(x)][-1:]
            for norm in sources:
                baseline.readers[norm].append(module)

        hooks = [norm.register_forward_hook(keep_output) for norm in baseline.readers]
        hooks += [linear.register_forward_pre_hook(read) for linear in linears]
        baseline.output = tensors_in(self._run(hooks))
        return baseline

    def reached(
        self,
        smooth: nn.Module,
        candidates: Sequence[nn.Module],
        baseline: Baseline,
        passengers: Sequence[nn.Module] = (),
    ) -> list[bool]:
        """Which candidates receive ``smooth``'s output channels linearly, channel for channel.

        A few output channels of ``smooth`` are multiplied by ``PROBE_FACTOR`` (and the
        passengers' columns divided by it, so a router keeps routing the same tokens); a
        candidate passes when exactly the same input channels are multiplied by it and the
        others do not change. The block stops as soon as every candidate has read its input.

        Args:
            smooth: the smooth layer.
            candidates: linear layers watched by ``baseline``, with as many input channels
                as ``smooth`` has output channels.
            baseline: the unchanged run.
            passengers: modules reading ``smooth``'s output that keep their outputs.

        Returns:
            One flag per candidate.
        """
        probed = _probed_channels(output_width(smooth))
        factors = torch.where(probed, PROBE_FACTOR, 1.0)
        seen: dict[nn.Module, Tensor] = {}

        def read(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(module, args[0])
            if len(seen) == len(candidates):
                raise _Stop

        with _restored([smooth, *passengers]):
            names = ("",) * len(passengers)
            riders = SmoothingMapping("", smooth, (), (), names, tuple(passengers))
            apply_smoothing(riders, 1 / factors, notify=False)
            self._run([candidate.register_forward_pre_hook(read) for candidate in candidates])
        return [
            candidate in seen and _scaled(seen[candidate], baseline.inputs[candidate], probed)
            for candidate in candidates
        ]

    def scales_exactly(self, norm: nn.Module, baseline: Baseline) -> bool:
        """Whether multiplying a few channels of ``norm``'s weight (and bias) by
        ``PROBE_FACTOR`` multiplies exactly those channels of its output by it.

        Args:
            norm: a normalization layer watched by ``baseline``.
            baseline: the unchanged run.

        Returns:
            True for a norm whose output is its weight times something (False for ``x * (1 +
            w)``), so a scale folded into the weight reaches its readers.
        """
        width = output_width(norm)
        probed = _probed_channels(width)
        seen: list[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(output)
            raise _Stop

        with _restored([norm]):
            scale_outputs(norm, torch.where(probed, PROBE_FACTOR, 1.0))
            self._run([norm.register_forward_hook(keep)])
        return (
            bool(seen)
            and isinstance(seen[0], Tensor)
            and _scaled(seen[0], baseline.norm_outputs[norm], probed)
        )

    def preserves_output(self, mappings: Sequence[SmoothingMapping], baseline: Baseline) -> bool:
        """Whether smoothing with ``s = PROBE_FACTOR`` leaves the block's output unchanged.

        Args:
            mappings: applied together.
            baseline: the unchanged run.

        Returns:
            True when every output tensor matches the baseline.
        """
        layers = [
            layer for item in mappings for layer in (item.smooth, *item.balances, *item.passengers)
        ]
        with _restored(layers):
            for item in mappings:
                scale = torch.full((output_width(item.smooth),), PROBE_FACTOR)
                apply_smoothing(item, scale, notify=False)
            output = tensors_in(self._run([]))
        return len(output) == len(baseline.output) and all(
            _close(got, want) for got, want in zip(output, baseline.output, strict=True)
        )

    def _run(self, hooks: list[torch.utils.hooks.RemovableHandle]) -> Any:
        """Runs the block with every modifier's hooks off and its experts on their routed
        tokens only (the output is the same, at a fraction of the cost of calibrating every
        expert on every token), then removes ``hooks``."""
        experts = [m for m in self.block.modules() if isinstance(m, LinearExperts)]
        saved = [module.calibrate_all for module in experts]
        try:
            for module in experts:
                module.calibrate_all = False
            with torch.no_grad(), Modifier.disable_hooks():
                return self.call.replay(self.block)
        except _Stop:
            return None
        finally:
            for module, flag in zip(experts, saved, strict=True):
                module.calibrate_all = flag
            for handle in hooks:
                handle.remove()


@contextmanager
def _restored(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Puts the layers' weights and biases back bit for bit on leaving."""
    saved = [
        (tensor, tensor.detach().clone())
        for layer in dict.fromkeys(layers)
        for tensor in (layer.weight, getattr(layer, "bias", None))
        if tensor is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def reads_rows(source: Tensor, x: Tensor) -> bool:
    """Whether every row of ``x`` (a vector along its last axis) is a row of ``source``, bit for
    bit: ``x`` is ``source``, a view of it, or rows gathered from it (the tokens routed to an
    expert), possibly cast to a wider floating-point type without loss.

    Args:
        source: a tensor ``[..., channels]`` (a normalization layer's output).
        x: what a layer read.

    Returns:
        True when ``x`` holds nothing but rows of ``source``.
    """
    return _RowIndex(source).holds(x)


class _RowIndex:
    """The rows of a tensor, fingerprinted and sorted once, for :func:`reads_rows` checks."""

    def __init__(self, source: Tensor) -> None:
        self.source = source
        self._table: Tensor | None = None
        self._keys: Tensor | None = None
        self._order: Tensor | None = None
        self._sorted: Tensor | None = None

    def holds(self, x: Tensor) -> bool:
        """Whether every row of ``x`` is a row of the source (see :func:`reads_rows`)."""
        source = self.source
        if x.shape[-1:] != source.shape[-1:] or x.device != source.device or x.numel() == 0:
            return False
        if _same_memory(source, x):
            return True
        if x.dtype != source.dtype:
            if not (x.is_floating_point() and source.is_floating_point()):
                return False
            narrowed = x.to(source.dtype)
            if not torch.equal(narrowed.to(x.dtype), x):
                return False
            x = narrowed
        if self._table is None:
            self._table = source.reshape(-1, source.shape[-1])
            self._keys = _row_keys(self._table)
            self._order = self._keys.argsort()
            self._sorted = self._keys[self._order]
        rows = x.reshape(-1, x.shape[-1])
        wanted = _row_keys(rows)
        where = torch.searchsorted(self._sorted, wanted).clamp(max=self._keys.numel() - 1)
        match = self._order[where]
        return bool((self._keys[match] == wanted).all()) and torch.equal(self._table[match], rows)


def _same_memory(source: Tensor, x: Tensor) -> bool:
    """Whether ``x`` is ``source`` or a view of all of it with the same element order."""
    return same_input(source, x) or (
        x.data_ptr() == source.data_ptr()
        and x.dtype == source.dtype
        and x.device == source.device
        and x.numel() == source.numel()
        and x.is_contiguous()
        and source.is_contiguous()
    )


def _row_keys(rows: Tensor) -> Tensor:
    """An exact integer fingerprint of each row's bits (equal rows, equal keys)."""
    bits = rows.detach().contiguous().view(torch.int16).long()
    generator = torch.Generator().manual_seed(bits.shape[-1])
    weights = torch.randint(1, 2**31 - 1, (bits.shape[-1],), generator=generator)
    return (bits * weights.to(bits.device)).sum(dim=-1)


def _probed_channels(width: int) -> Tensor:
    """The channels a probe multiplies: up to ``PROBED_CHANNELS``, spread over ``width``."""
    probed = torch.zeros(width, dtype=torch.bool)
    probed[torch.linspace(0, width - 1, min(width, PROBED_CHANNELS)).round().long()] = True
    return probed


def _scaled(got: Tensor, base: Tensor, probed: Tensor) -> bool:
    """Whether ``got`` is ``base`` with the ``probed`` channels times ``PROBE_FACTOR``."""
    if got.shape != base.shape:
        return False
    probed = probed.to(base.device)
    expected = base[..., probed] * PROBE_FACTOR
    if not bool(expected.any()):  # dead channels prove nothing
        return False
    return _close(got[..., probed], expected) and _close(got[..., ~probed], base[..., ~probed])


def _close(got: Tensor, want: Tensor) -> bool:
    if got.shape != want.shape:
        return False
    want = want.float()
    error = (got.float() - want).norm()
    return bool(error <= TOLERANCE * want.norm())

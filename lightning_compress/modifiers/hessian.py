"""Second-order math shared by GPTQ and SparseGPT: the Hessian, its factor, the OBS sweep.

For a linear layer ``y = x W^T`` the layer-wise reconstruction error
``||(W - W_hat) X^T||^2 / n`` has the Hessian ``H = (2 / n) X^T X`` with respect to each
row of ``W``. GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023) both walk
the columns of ``W`` in order, replace each column by a compressed one and correct the
columns not yet visited for the change. Their papers spread each change forward with the
upper Cholesky factor of ``H^-1``; :class:`BlockwiseOBS` gathers the earlier changes into each
column instead, with the Cholesky factor of ``H`` itself (Babai's nearest-plane form: the
same values in exact arithmetic, without inverting anything), a block of columns at a time
("lazy batch updates").

Layout: the functions here and in ``gptq.py`` / ``sparsegpt.py`` take weights in
``nn.Linear`` layout ``[out_features, in_features]``. GPT-2's ``Conv1D`` (weight
``[in_features, out_features]``) is swapped for an ``nn.Linear`` holding the transposed
weight before any modifier runs (:mod:`lightning_compress.layers.conv1d`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.core.gram_bands import band_width
from lightning_compress.modifiers.tiled_cholesky import reverse_cholesky

SUB_BLOCK = 16
"""Columns per sub-block of the sweep inside a lazy block (see ``BlockwiseOBS``)."""
PERMUTE_STRIP = 256
"""Rows per strip in which :func:`_permute_in_place` gathers a matrix's columns."""

__all__ = [
    "BlockwiseOBS",
    "ColumnTarget",
    "HessianAccumulator",
    "HessianWorkspace",
    "DampedFactor",
    "SingularHessianError",
    "all_finite",
    "damp_and_factor",
]


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no infinity.

    Its minimum and maximum tell (both are NaN where any value is): two reductions, without
    the full-size boolean tensor of ``isfinite(tensor).all()`` (20x faster on a Hessian), each
    on its own (``aminmax`` takes 15x longer on a triangular factor).
    """
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amin()) & torch.isfinite(tensor.amax()))


class HessianAccumulator:
    """``H = (2 / n) * sum(x x^T)`` over the inputs of one linear layer.

    ``n`` counts tokens: the rows of the inputs flattened over every leading dimension
    (batch, sequence), minus the ones a mask drops. (GPTQ's reference counts sequences;
    that only scales ``H`` by a constant, which GPTQ and SparseGPT do not depend on.)

    Each batch's mean ``X^T X / b`` (``b`` rows) is computed in the input's precision (at
    least float32: the costly part), with the rows scaled by ``1 / sqrt(b)`` first so that it
    cannot overflow, into a buffer kept between batches (no fresh allocation per batch),
    converted into a second one in the accumulation dtype and added, times ``2 b``, to the
    sum ``S = H * n`` (one pass over ``S`` per batch). ``H`` is symmetric, so only the upper
    triangle of ``S`` is kept, in row bands of ``GRAM_BAND`` rows (``core/gram_bands.py``),
    each a tensor of its own holding the columns from the band on (about half the memory of
    the square); inputs of fewer than 384 features keep one band, the square. A batch's mean
    is the same whichever rank computes it. Float64 accumulation (the default) cannot
    overflow; float32 halves the memory but overflows once ``S`` passes ~3e38.

    Offloading: ``to("cpu")`` keeps ``S`` in host memory; :meth:`add` still computes each
    batch's product on the input's device and adds it where ``S`` lives.

    Distributed: each rank accumulates its own data, then calls :meth:`reduce_over_ranks_`;
    the result equals one process that saw all the data, up to the order of floating-point
    sums.

    Args:
        in_features: the layer's input size.
        dtype: accumulation dtype, ``torch.float32`` or ``torch.float64``.
        device: where ``S`` lives.
    """

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is invalid: expected torch.float32 or torch.float64")
        width = band_width(in_features)
        self._starts = list(range(0, in_features, width))
        # S's upper triangle: band i holds rows [start, start + width), columns from start on
        self._upper = [
            torch.zeros(
                min(width, in_features - start), in_features - start, dtype=dtype, device=device
            )
            for start in self._starts
        ]
        self._in_features, self._dtype = in_features, dtype
        self._device = torch.empty(0, device=device).device
        self._bands: list[_Band] = []
        self._num_samples = 0

    @property
    def num_samples(self) -> int:
        """Tokens accumulated so far."""
        return self._num_samples

    @property
    def in_features(self) -> int:
        """The layer's input size."""
        return self._in_features

    @property
    def device(self) -> torch.device:
        """Where ``S`` lives."""
        return self._device

    @torch.no_grad()
    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Folds a batch of layer inputs into the sum.

        Args:
            x: inputs ``[..., in_features]``, e.g. ``[batch, seq, in_features]``.
            mask: optional, shaped like ``x.shape[:-1]`` (e.g. an attention mask
                ``[batch, seq]``); tokens where it is 0 / False are skipped.

        Raises:
            ValueError: when the last dimension or the mask's shape does not fit.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit a Hessian of "
                f"in_features={self.in_features}: the last dimension must match"
            )
        rows = x.reshape(-1, self.in_features)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not fit input of shape "
                    f"{tuple(x.shape)}: expected {tuple(x.shape[:-1])}"
                )
            rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        if rows.shape[0] == 0:
            return
        count = rows.shape[0]
        # scaled by 1 / sqrt(count): each batch's product is its mean, which cannot overflow
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32)) * (1 / math.sqrt(count))
        for band in self._band_plan(rows):
            left, right = rows[:, band.start : band.stop].T, rows[:, band.start :]
            if band.product is None:
                band.total.addmm_(left, right, alpha=2 * count)
            else:
                torch.mm(left, right, out=band.product)
                band.total.add_(band.converted.copy_(band.product), alpha=2 * count)
        self._num_samples += count

    def _band_plan(self, rows: Tensor) -> list[_Band]:
        """The bands of the upper triangle (row band ``[i, i + b)`` against the columns from
        ``i`` on), with the product and conversion buffers for rows of ``rows``' dtype and
        device: made on first use, then reused (no allocation per batch)."""
        band = self._bands[0] if self._bands else None
        if band is not None and band.rows_like == (rows.dtype, rows.device):
            return self._bands
        width, size = band_width(self.in_features), self.in_features
        direct = rows.dtype == self._dtype and rows.device == self._device
        if not direct:
            product = torch.empty(width * size, dtype=rows.dtype, device=rows.device)
            converted = torch.empty_like(product, dtype=self._dtype, device=self._device)
        self._bands = []
        for start, total in zip(self._starts, self._upper, strict=True):
            shape, count = total.shape, total.numel()
            self._bands.append(
                _Band(
                    start,
                    start + shape[0],
                    total,
                    None if direct else product[:count].view(shape),
                    None if direct else converted[:count].view(shape),
                    (rows.dtype, rows.device),
                )
            )
        return self._bands

    def hessian(
        self,
        dtype: torch.dtype | None = None,
        samples: int | None = None,
        workspace: HessianWorkspace | None = None,
    ) -> Tensor:
        """Returns ``H`` ``[in_features, in_features]`` (a new tensor, or one made in
        ``workspace``).

        Each entry is divided in the sum's dtype and then rounded to ``dtype``: the numbers
        of ``hessian().to(dtype)``, made in one pass over the sum's bands (each band divided
        straight into the result, then copied into the lower triangle as a block), without a
        full-size copy in the sum's dtype.

        Args:
            dtype: the result's dtype; None keeps the sum's.
            samples: the count ``n`` to divide by; None: the tokens accumulated.
            workspace: where to make ``H`` (its memory is reused by its next Hessian); None:
                new memory.

        Returns:
            ``H``, symmetric, in ``dtype`` on the sum's device (zeros when ``n`` is 0).
        """
        size = self.in_features
        count = self._num_samples if samples is None else samples
        dtype = dtype or self._dtype
        if workspace is None:
            result = torch.empty(size, size, dtype=dtype, device=self._device)
        else:
            result = workspace.take(size, dtype, self._device)
        if not count:
            return result.zero_()
        for start, band in zip(self._starts, self._upper, strict=True):
            stop = start + band.shape[0]
            upper = band[:, : stop - start].triu()
            corner = upper.T + upper  # exact: one of each pair is 0
            corner.diagonal().copy_(upper.diagonal())
            torch.div(corner, count, out=result[start:stop, start:stop])
            right = result[start:stop, stop:]
            torch.div(band[:, stop - start :], count, out=right)
            result[stop:, start:stop].copy_(right.T)
        return result

    def scale_inputs_(self, factors: Tensor) -> None:
        """Makes ``H`` that of inputs multiplied by ``factors``: ``diag(f) H diag(f)``.

        Args:
            factors: ``[in_features]``.
        """
        factors = factors.to(device=self._device, dtype=self._dtype)
        for start, band in zip(self._starts, self._upper, strict=True):
            band.mul_(factors[start : start + band.shape[0], None]).mul_(factors[None, start:])

    def to(self, device: torch.device | str) -> HessianAccumulator:
        """Moves ``S`` to ``device`` (``"cpu"`` offloads it) and returns ``self``."""
        self._upper = [band.to(device) for band in self._upper]
        self._device = torch.empty(0, device=device).device
        self._bands = []
        return self

    def merge(self, other: HessianAccumulator) -> None:
        """Folds another accumulator's data into this one.

        Args:
            other: an accumulator for a layer of the same input size.

        Raises:
            ValueError: when the input sizes differ.
        """
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge a Hessian of in_features={other.in_features} into one of "
                f"in_features={self.in_features}"
            )
        for band, theirs in zip(self._upper, other._upper, strict=True):
            band.add_(theirs.to(band))
        self._num_samples += other.num_samples

    def reduce_over_ranks_(self) -> None:
        """Sums ``S`` and ``n`` over all ranks in place (a collective; every rank calls it for
        the same layers in the same order): each band of the upper triangle in its own
        memory, no copy. The result equals one process that saw all the data, up to the
        order of floating-point sums. A no-op in one process."""
        for band in self._upper:
            all_reduce_sum_(band)
        count = torch.tensor([self._num_samples], dtype=torch.int64, device=self._device)
        self._num_samples = int(all_reduce_sum_(count).item())


class HessianWorkspace:
    """One buffer in which successive solves make their Hessians, kept between them.

    A ``[n, n]`` Hessian made in new memory makes the process map and zero its pages again on
    every solve, which costs most on virtual machines, where memory a process touches for the
    first time can cost several times more; one buffer, grown to the largest Hessian asked
    for, is mapped once. A Hessian made here is valid until the next one is: one solve at a
    time.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def take(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Returns a ``[size, size]`` matrix in the buffer (values undefined).

        Args:
            size: the Hessian's inputs.
            dtype: its dtype.
            device: its device.

        Returns:
            A view of the buffer, grown or remade first when it is too small or of another
            dtype or device.
        """
        needed, wanted = size * size, (dtype, torch.device(device))
        buffer = self._buffer
        if buffer is None or buffer.numel() < needed or (buffer.dtype, buffer.device) != wanted:
            self._buffer = None  # the old memory goes before the new is taken
            self._buffer = buffer = torch.empty(needed, dtype=dtype, device=device)
        return buffer[:needed].view(size, size)

    def release(self) -> None:
        """Frees the buffer."""
        self._buffer = None


class _Band(NamedTuple):
    """One row band of :class:`HessianAccumulator`'s upper triangle."""

    start: int
    stop: int
    total: Tensor
    """``S[start:stop, start:]`` (a view)."""
    product: Tensor | None
    """Where the batch product goes (rows' dtype and device); None: straight into ``total``."""
    converted: Tensor | None
    """The product converted to ``S``'s dtype and device."""
    rows_like: tuple[torch.dtype, torch.device]
    """The dtype and device of the rows the buffers are for."""


class SingularHessianError(ValueError):
    """The damped Hessian could not be factored (not positive definite)."""


class DampedFactor(NamedTuple):
    """What :func:`damp_and_factor` returns."""

    upper: Tensor
    """``R``, upper triangular with ``R R^T = H + lambda I`` (so ``R^-1`` is the upper Cholesky
    factor of ``(H + lambda I)^-1`` that GPTQ's paper uses)."""
    dead: Tensor
    """Bool ``[in]``: inputs that were always zero; the caller zeroes those weight columns."""
    dampening_frac: float
    """The dampening fraction that succeeded (larger than asked after a retry)."""


def damp_and_factor(
    hessian: Tensor,
    dampening_frac: float = 0.01,
    max_retries: int = 3,
    overwrite: bool = False,
    order: Tensor | None = None,
) -> DampedFactor:
    """Dampens the Hessian and returns its upper triangular factor ``R`` (``R R^T = H``).

    Dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1``; then
    ``lambda = dampening_frac * mean(diag(H))`` is added to the diagonal. When the
    result is not positive definite the dampening is retried 10x larger, up to
    ``max_retries`` times. ``hessian`` itself is left unchanged unless ``overwrite``.

    ``R`` is the Cholesky factor of ``H`` read backwards: with ``P`` the reversal permutation
    and ``P H P = L L^T``, ``R = P L P`` (``tiled_cholesky.reverse_cholesky``). With ``order``,
    the result is that of ``H[order][:, order]`` (the inputs visited in that order), permuted
    in the one copy the dampening needs anyway.

    Args:
        hessian: ``H`` ``[in, in]``, float32 or float64.
        dampening_frac: dampening as a fraction of the mean diagonal, ``>= 0``.
        max_retries: how many 10x larger dampenings to try after the first.
        overwrite: whether ``hessian`` may be changed instead of left as it is: for a
            caller that made it for this call (its buffer then holds the permuted copy).
        order: a permutation of the inputs, or None for their natural order.

    Returns:
        The factor, the dead inputs (in ``order``) and the dampening fraction used.

    Raises:
        ValueError: when ``hessian`` is not square, ``order`` does not fit or an argument is
            out of range.
        SingularHessianError: when ``H`` holds NaN/inf or no dampening made it positive
            definite; the message says what was tried (the caller adds the layer's name).
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} is invalid: expected [in, in]")
    if order is not None and not _is_permutation(order, hessian.shape[0]):
        raise ValueError(
            f"order of shape {tuple(order.shape)} is invalid: expected a permutation of the "
            f"{hessian.shape[0]} inputs, each once"
        )
    if not dampening_frac >= 0 or max_retries < 0:
        raise ValueError(
            f"dampening_frac={dampening_frac!r}, max_retries={max_retries!r} are invalid: "
            "expected dampening_frac >= 0 and max_retries >= 0"
        )
    if not all_finite(hessian):
        raise SingularHessianError(
            "the Hessian holds NaN or inf values: check the calibration inputs of this layer "
            "(e.g. overflow in float16 activations)"
        )
    ordered = _ordered_copy(hessian, order, overwrite)
    diagonal = ordered.diagonal()  # strided: summed as the Hessian's own diagonal is
    dead = diagonal == 0
    diagonal[dead] = 1
    mean_diagonal = diagonal.mean()
    undamped = diagonal.clone()
    retries = max_retries if dampening_frac > 0 else 0
    tried = [dampening_frac * 10**k for k in range(retries + 1)]
    for frac in tried:
        diagonal.copy_(undamped).add_(frac * mean_diagonal)
        upper, factored = reverse_cholesky(ordered, overwrite=True)  # restored on failure
        if factored:
            return DampedFactor(upper, dead, frac)
    raise SingularHessianError(
        f"the Hessian is not positive definite even with dampening_frac in {tried} "
        f"(lambda = dampening_frac * mean(diag(H)), mean(diag(H)) = {mean_diagonal.item():.4g}): "
        f"raise dampening_frac above {tried[-1]:g}, or calibrate with more (and more varied) "
        "samples, or accumulate the Hessian in float64"
    )


def _is_permutation(order: Tensor, size: int) -> bool:
    """Whether ``order`` holds each of ``0 .. size - 1`` once."""
    if order.shape != (size,):
        return False
    return torch.equal(order.sort().values.cpu(), torch.arange(size))


def _ordered_copy(hessian: Tensor, order: Tensor | None, overwrite: bool) -> Tensor:
    """``H[order][:, order]`` (``order`` None: ``H``) as a copy the caller may change: in
    ``hessian``'s buffer when ``overwrite`` (``hessian`` itself when no ``order``), else in a
    clone, permuted in place (:func:`_permute_in_place`: no second matrix-sized buffer)."""
    ordered = hessian if overwrite else hessian.clone()
    if order is not None:
        _permute_in_place(ordered, order.tolist())
    return ordered


def _permute_in_place(matrix: Tensor, order: list[int]) -> None:
    """Makes ``matrix`` ``matrix[order][:, order]`` with buffers of :data:`PERMUTE_STRIP`
    rows at most: the rows moved along the permutation's cycles (one row held aside per
    cycle), then each strip of rows gathered by columns and copied back."""
    visited = [False] * len(order)
    for start in range(len(order)):
        if visited[start] or order[start] == start:
            continue
        held = matrix[start].clone()
        row = start
        while order[row] != start:  # row takes the row it is given, which then is free
            visited[row] = True
            matrix[row] = matrix[order[row]]
            row = order[row]
        visited[row] = True
        matrix[row] = held
    columns = torch.tensor(order, device=matrix.device)
    strip = matrix.new_empty(min(PERMUTE_STRIP, matrix.shape[0]), matrix.shape[1])
    for first in range(0, matrix.shape[0], PERMUTE_STRIP):
        rows = matrix[first : first + PERMUTE_STRIP]
        gathered = torch.index_select(rows, 1, columns, out=strip[: rows.shape[0]])
        rows.copy_(gathered)


ColumnTarget = Callable[[int, Tensor, "BlockwiseOBS"], Tensor]
"""``target(j, w, sweep) -> q``: the compressed value of column ``j`` given its current value
``w`` ``[out]``, a buffer of the sweep's that the target may overwrite and return as ``q``
(or it returns a new tensor); it may look ahead with ``sweep.current`` and ``sweep.factor``."""


class BlockwiseOBS:
    """One left-to-right OBS sweep over the columns of a weight, with lazy batch updates.

    GPTQ's paper, with ``U`` the upper Cholesky factor of ``H^-1``, compresses each column
    ``j`` to ``q`` and spreads its error forward: ``W[:, k] -= (w_j - q) / U[j, j] * U[j, k]``.
    This sweep computes the same values without inverting ``H``: with ``R = U^-1`` (upper,
    ``R R^T = H``: :func:`damp_and_factor`), the value column ``j`` reaches after every
    earlier column's correction is ``w_j + sum_{i<j} (w_i - q_i) R[i, j] / R[j, j]``, from
    the original weights ``w``: Babai's nearest-plane form (Chen et al. 2025, "The Geometry of
    LLM Quantization: GPTQ as Babai's Nearest Plane Algorithm"), equal in exact arithmetic.
    Each block of ``block_size`` columns starts with one product gathering the earlier
    blocks' changes ``w - q``; inside a block each change is pushed into the rest of its
    sub-block of :data:`SUB_BLOCK` columns at once, and into the rest of the block by one
    product per sub-block. Saved against inverting: the triangular inverse, about the flops
    of the factorization (at 2816 inputs about 0.1 s of a 0.53 s GPTQ call on one CPU
    thread). Cost: the changes of the visited columns are kept, one more weight-sized
    buffer in the working dtype.

    The constructor dampens and factors ``H`` and zeroes the weight columns of dead inputs.
    Work happens on the weight's device, in float32, or in float64 when the weight or the
    Hessian is float64. A sweep runs once.

    Attributes:
        weight: the working copy, compressed in place by :meth:`run`.
        factor: ``R``, upper triangular, ``R R^T`` the damped ``H`` (in the sweep's order).
        dead: bool ``[in]``, the dead inputs.
        dampening_frac: the dampening fraction used.
        block: ``(first, last)`` columns of the current block.
        row_losses: ``[out]``, each row's share of the loss :meth:`run` returns (rows are
            compressed independently, so a sweep over stacked weights that share ``H``
            equals one sweep per weight).

    Args:
        weight: ``[out, in]`` in ``nn.Linear`` layout (not modified).
        hessian: ``H`` ``[in, in]`` of the layer's inputs (not modified unless
            ``consume_hessian``).
        block_size: columns per lazy block.
        dampening_frac: dampening as a fraction of the mean diagonal of ``H``.
        consume_hessian: whether ``hessian`` was made for this sweep, so that it may be
            changed instead of copied.
        order: the order in which the sweep visits the columns (a permutation of them), or
            None for their natural order; :attr:`weight`, :attr:`factor` and :attr:`dead` are
            in this order.

    Raises:
        ValueError: when the shapes or ``order`` do not fit, or ``block_size < 1``.
        SingularHessianError: see :func:`damp_and_factor`.
    """

    def __init__(
        self,
        weight: Tensor,
        hessian: Tensor,
        block_size: int = 128,
        dampening_frac: float = 0.01,
        consume_hessian: bool = False,
        order: Tensor | None = None,
    ) -> None:
        if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} and hessian of shape "
                f"{tuple(hessian.shape)} do not fit: expected [out, in] and [in, in] "
                "(transpose Conv1D weights to [out, in] first)"
            )
        if block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: expected an int >= 1")
        dtype = torch.promote_types(torch.promote_types(weight.dtype, hessian.dtype), torch.float32)
        converted = hessian.to(device=weight.device, dtype=dtype)
        factor = damp_and_factor(
            converted,
            dampening_frac,
            overwrite=consume_hessian or converted is not hessian,
            order=order,
        )
        self.factor = factor.upper
        self.dead = factor.dead
        self.dampening_frac = factor.dampening_frac
        self.block_size = block_size
        # Column-major working copy: row j of ``_columns`` is weight column j (in ``order``),
        # contiguous; the columns gathered, then transposed in blocks (3x faster than
        # gathering rows of the transpose)
        ordered = weight.detach().to(dtype)
        if order is not None:
            ordered = ordered.index_select(1, order.to(weight.device))
        self._columns = ordered.T.clone(memory_format=torch.contiguous_format)
        self._columns[self.dead] = 0
        self._changes = torch.empty_like(self._columns)  # w - q of each visited column
        self.block = (0, 0)
        self._sub_block = (0, 0)
        self._column = 0
        self._gathered = self._columns[:0]
        self.row_losses = self._columns.new_zeros(self._columns.shape[1])

    @property
    def weight(self) -> Tensor:
        """The working weight ``[out, in]`` (a view; compressed in place by :meth:`run`)."""
        return self._columns.T

    def current(self, start: int, stop: int) -> Tensor:
        """Returns the values columns ``[start, stop)`` hold after every correction so far.

        These are the values GPTQ's paper's forward updates leave in those columns once the
        columns before the one being compressed are done: ``w + (R_b^T)^-1 g``, where ``g``
        gathers the earlier changes through ``R``'s rows above and ``R_b`` is ``R``'s
        diagonal block from the column being compressed to ``stop`` (one triangular solve).

        Args:
            start: first column, at or after the column being compressed.
            stop: end of the range (clipped to the weight's width).

        Returns:
            ``[out, stop - start]``, a copy.

        Raises:
            ValueError: when ``start`` is before the column being compressed.
        """
        return self.current_columns(start, stop).T

    def current_columns(self, start: int, stop: int) -> Tensor:
        """:meth:`current` in the sweep's layout: ``[stop - start, out]``, row ``i`` is column
        ``start + i`` (a copy)."""
        column = self._column
        if start < column:
            raise ValueError(
                f"start={start} is before column {column}, the one being compressed: "
                "earlier columns are final"
            )
        stop = min(stop, self._columns.shape[0])
        if start >= stop:
            return self._columns[start:start].clone()
        gathered = self._gathered_from(column, stop)
        diagonal_block = self.factor[column:stop, column:stop]
        solved = torch.linalg.solve_triangular(diagonal_block.T, gathered, upper=False)
        return solved[start - column :].add_(self._columns[start:stop])

    def _gathered_from(self, column: int, stop: int) -> Tensor:
        """``sum_{i<column} (w_i - q_i) R[i, k]`` for ``k`` in ``[column, stop)``, ``[stop -
        column, out]``: what the current sub-block's rows already hold, plus the pending
        changes of the sub-block for the rest of the block, plus every earlier change for
        the columns after the block."""
        first, last = self.block
        sub_first, sub_last = self._sub_block
        pieces = []
        if column < min(stop, sub_last):
            pieces.append(self._gathered[column - first : min(stop, sub_last) - first].clone())
        begin, end = max(column, sub_last), min(stop, last)
        if begin < end:
            pending = self.factor[sub_first:column, begin:end].T @ self._changes[sub_first:column]
            pieces.append(pending.add_(self._gathered[begin - first : end - first]))
        if max(column, last) < stop:
            later = self.factor[:column, max(column, last) : stop]
            pieces.append(later.T @ self._changes[:column])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def run(self, target: ColumnTarget) -> tuple[Tensor, float]:
        """Compresses every column in order.

        Args:
            target: gives each column's compressed value (see :data:`ColumnTarget`).

        Returns:
            The compressed weight (working dtype) and the loss ``sum((w - q)^2 / d^2) / 2``
            (``w`` the value compressed, ``d = U[j, j] = 1 / R[j, j]``), which equals
            ``tr(dW H dW^T) / 2`` for the damped ``H``, the mean squared output error per
            token when ``H`` comes from :class:`HessianAccumulator`.
        """
        width = self._columns.shape[0]
        diagonal = self.factor.diagonal()
        # buffers and their per-column views made once for the whole sweep (a fresh buffer
        # per block costs page faults, each view a dispatch per column)
        views = _BlockViews(self._columns, self.block_size)
        for first in range(0, width, self.block_size):
            last = min(first + self.block_size, width)
            self.block = (first, last)
            buffers = views.of_size(last - first)
            # [block, out]: sum over the earlier blocks' columns i of (w_i - q_i) R[i, j]
            self._gathered = torch.mm(
                self.factor[:first, first:last].T, self._changes[:first], out=buffers.gathered
            )
            with _one_thread():  # tiny ops: intra-op threads would only add fork/join waits
                self._sweep_block(first, last, buffers, target)
            # (value - q) R[j, j] = (w - q) R[j, j] + gathered_j, each row's loss term
            error = self._gathered.addcmul_(self._changes[first:last], diagonal[first:last, None])
            self.row_losses += error.square_().sum(dim=0) / 2
        return self.weight, self.row_losses.sum().item()

    def _sweep_block(self, first: int, last: int, buffers: _Block, target: ColumnTarget) -> None:
        """The column loop of :meth:`run` for columns ``[first, last)``: column ``j`` is
        compressed from ``w_j + gathered_j / R[j, j]`` (made in its row of
        ``buffers.values``, which the target may overwrite), and its change pushed into the
        ``gathered`` rows of the rest of its sub-block at once and of the rest of the block
        by one product per sub-block (the same lazy batching as between blocks, one level
        down). The block's compressed columns are written back at its end (nothing reads a
        visited column before)."""
        gathered, values, factor, gathered_rows, value_rows, diagonal, *tails = buffers
        gathered_tails, factor_tails = tails
        factor.copy_(self.factor[first:last, first:last])
        columns, changes = self._columns[first:last], self._changes[first:last]
        column_rows, change_rows = columns.unbind(0), changes.unbind(0)
        size = last - first
        for start in range(0, size, SUB_BLOCK):
            stop = min(start + SUB_BLOCK, size)
            self._sub_block = (first + start, first + stop)
            for i in range(start, stop):
                self._column = first + i
                w, value = column_rows[i], value_rows[i]
                torch.addcdiv(w, gathered_rows[i], diagonal[i], out=value)
                q = target(first + i, value, self)
                if q is not value:
                    value.copy_(q)
                change = torch.sub(w, value, out=change_rows[i])
                if i + 1 < stop:
                    gathered_tails[i].addr_(factor_tails[i], change)
            if stop < size:
                gathered[stop:].addmm_(factor[start:stop, stop:].T, changes[start:stop])
        columns.copy_(values)


class _Block(NamedTuple):
    """The buffers of one block of a sweep and their per-column views."""

    gathered: Tensor
    """``[size, out]``: what each column of the block gathers from the earlier changes."""
    values: Tensor
    """``[size, out]``: each column's value before, then after, compression."""
    factor: Tensor
    """``[size, size]``: the block's diagonal block of ``R``, copied in."""
    gathered_rows: tuple[Tensor, ...]
    value_rows: tuple[Tensor, ...]
    diagonal: tuple[Tensor, ...]
    """0-d views of ``factor``'s diagonal (dividing by a Python float would wrap it in a new
    tensor every column)."""
    gathered_tails: list[Tensor]
    """Row ``i``'s: the rows of ``gathered`` after ``i`` in its sub-block."""
    factor_tails: list[Tensor]
    """Row ``i``'s: the entries of ``factor``'s row ``i`` after ``i`` in its sub-block."""


class _BlockViews:
    """The block buffers of one sweep, with their views for each block size met (the full
    block and a shorter last one)."""

    def __init__(self, columns: Tensor, block_size: int) -> None:
        size = min(block_size, columns.shape[0])
        self._gathered = columns.new_empty(size, columns.shape[1])
        self._values = torch.empty_like(self._gathered)
        self._factor = columns.new_empty(size, size)
        self._blocks: dict[int, _Block] = {}

    def of_size(self, size: int) -> _Block:
        """The buffers for a block of ``size`` columns."""
        if size not in self._blocks:
            gathered, values = self._gathered[:size], self._values[:size]
            factor = self._factor[:size, :size]
            stops = [min((i // SUB_BLOCK + 1) * SUB_BLOCK, size) for i in range(size)]
            self._blocks[size] = _Block(
                gathered,
                values,
                factor,
                gathered.unbind(0),
                values.unbind(0),
                factor.diagonal().unbind(0),
                [gathered[i + 1 : stop] for i, stop in enumerate(stops)],
                [factor[i, i + 1 : stop] for i, stop in enumerate(stops)],
            )
        return self._blocks[size]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs the body with one intra-op thread, then restores the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

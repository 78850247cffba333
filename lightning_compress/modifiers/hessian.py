"""Second-order math shared by GPTQ and SparseGPT: the Hessian, its inverse, the OBS sweep.

For a linear layer ``y = x W^T`` the layer-wise reconstruction error
``||(W - W_hat) X^T||^2 / n`` has the Hessian ``H = (2 / n) X^T X`` with respect to each
row of ``W``. GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023) both walk
the columns of ``W`` in order, replace each column by a compressed one and spread the
error onto the columns not yet visited, using the upper Cholesky factor of ``H^-1``
("lazy batch updates": the spreading beyond the current block of columns is deferred
and done as one matrix product per block).

Layout: the functions here and in ``gptq.py`` / ``sparsegpt.py`` take weights in
``nn.Linear`` layout ``[out_features, in_features]``. GPT-2's ``Conv1D`` stores its weight
as ``[in_features, out_features]``: callers transpose it before and after (its inputs
are laid out like a linear layer's, so the Hessian needs no change).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BlockwiseOBS",
    "ColumnTarget",
    "HessianAccumulator",
    "InverseHessian",
    "SingularHessianError",
    "damp_and_invert",
]


class HessianAccumulator:
    """Running average ``H = (2 / n) * sum(x x^T)`` over the inputs of one linear layer.

    ``n`` counts tokens: the rows of the inputs flattened over every leading dimension
    (batch, sequence), minus the ones a mask drops. (GPTQ's reference counts sequences;
    that only scales ``H`` by a constant, which GPTQ and SparseGPT do not depend on.)

    Every batch's mean ``X^T X / b`` (``b`` rows) is computed in the input's precision (at
    least float32: the costly part), with the rows scaled by ``1 / sqrt(b)`` first, then
    folded into the running average in the accumulation dtype:
    ``H <- H * n_old / n_new + mean * 2 b / n_new``. No raw sum is ever formed, so large
    inputs or many tokens cannot overflow, and a batch's mean is the same whichever rank
    computes it.

    Offloading: ``to("cpu")`` keeps ``H`` in host memory; :meth:`add` still computes each
    batch's product on the input's device and adds it where ``H`` lives.

    Distributed: each rank accumulates its own data, then all-reduces (sums) the two
    tensors of :meth:`state` and calls :meth:`load_state`; the result equals one process
    that saw all the data, up to the order of floating-point sums.

    Args:
        in_features: the layer's input size.
        dtype: accumulation dtype, ``torch.float32`` or ``torch.float64``.
        device: where ``H`` lives.
    """

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is invalid: expected torch.float32 or torch.float64")
        self._hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._num_samples = 0

    @property
    def num_samples(self) -> int:
        """Tokens accumulated so far."""
        return self._num_samples

    @property
    def in_features(self) -> int:
        """The layer's input size."""
        return self._hessian.shape[0]

    @torch.no_grad()
    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Folds a batch of layer inputs into the average.

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
        total = self._num_samples + count
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32)) * (1 / math.sqrt(count))
        batch_mean = (rows.T @ rows).to(self._hessian)
        self._hessian.mul_(self._num_samples / total).add_(batch_mean, alpha=2 * count / total)
        self._num_samples = total

    def hessian(self) -> Tensor:
        """Returns ``H`` ``[in_features, in_features]`` (the live buffer, not a copy)."""
        return self._hessian

    def to(self, device: torch.device | str) -> HessianAccumulator:
        """Moves ``H`` to ``device`` (``"cpu"`` offloads it) and returns ``self``."""
        self._hessian = self._hessian.to(device)
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
        weighted, count = other.state()
        mine, my_count = self.state()
        self.load_state(mine + weighted.to(mine), my_count + count.to(my_count.device))

    def state(self) -> tuple[Tensor, Tensor]:
        """Returns ``(H * n, n)`` as tensors on ``H``'s device, ready to all-reduce (sum).

        Returns:
            The weighted sum ``[in, in]`` and the token count, an int64 tensor ``[1]``.
        """
        count = torch.tensor([self._num_samples], dtype=torch.int64, device=self._hessian.device)
        return self._hessian * self._num_samples, count

    def load_state(self, weighted: Tensor, count: Tensor) -> None:
        """Sets the average from a summed :meth:`state`: ``H = weighted / count``.

        Args:
            weighted: the sum of ``H * n`` over the parts.
            count: the sum of ``n`` over the parts.
        """
        total = int(count.sum().item())
        weighted = weighted.to(self._hessian)
        self._hessian = weighted / total if total else torch.zeros_like(weighted)
        self._num_samples = total


class SingularHessianError(ValueError):
    """The damped Hessian could not be inverted (not positive definite)."""


class InverseHessian(NamedTuple):
    """What :func:`damp_and_invert` returns."""

    upper: Tensor
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = H^-1``)."""
    dead: Tensor
    """Bool ``[in]``: inputs that were always zero; the caller zeroes those weight columns."""
    dampening_frac: float
    """The dampening fraction that succeeded (larger than asked after a retry)."""


def damp_and_invert(
    hessian: Tensor, dampening_frac: float = 0.01, max_retries: int = 3
) -> InverseHessian:
    """Dampens the Hessian and returns the upper Cholesky factor of its inverse.

    Dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1``; then
    ``lambda = dampening_frac * mean(diag(H))`` is added to the diagonal. When the
    result is not positive definite the dampening is retried 10x larger, up to
    ``max_retries`` times. ``hessian`` itself is left unchanged.

    Args:
        hessian: ``H`` ``[in, in]``, float32 or float64.
        dampening_frac: dampening as a fraction of the mean diagonal, ``>= 0``.
        max_retries: how many 10x larger dampenings to try after the first.

    Returns:
        The factor, the dead inputs and the dampening fraction used.

    Raises:
        ValueError: when ``hessian`` is not square or an argument is out of range.
        SingularHessianError: when ``H`` holds NaN/inf or no dampening made it invertible;
            the message says what was tried (the caller adds the layer's name).
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} is invalid: expected [in, in]")
    if not dampening_frac >= 0 or max_retries < 0:
        raise ValueError(
            f"dampening_frac={dampening_frac!r}, max_retries={max_retries!r} are invalid: "
            "expected dampening_frac >= 0 and max_retries >= 0"
        )
    if not torch.isfinite(hessian).all():
        raise SingularHessianError(
            "the Hessian holds NaN or inf values: check the calibration inputs of this layer "
            "(e.g. overflow in float16 activations)"
        )
    fixed = hessian.clone()
    diagonal = fixed.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1
    mean_diagonal = diagonal.mean()
    retries = max_retries if dampening_frac > 0 else 0
    tried = [dampening_frac * 10**k for k in range(retries + 1)]
    for frac in tried:
        upper = _upper_cholesky_of_inverse(fixed, frac * mean_diagonal)
        if upper is not None:
            return InverseHessian(upper, dead, frac)
    raise SingularHessianError(
        f"the Hessian is not positive definite even with dampening_frac in {tried} "
        f"(lambda = dampening_frac * mean(diag(H)), mean(diag(H)) = {mean_diagonal.item():.4g}): "
        f"raise dampening_frac above {tried[-1]:g}, or calibrate with more (and more varied) "
        "samples, or accumulate the Hessian in float64"
    )


def _upper_cholesky_of_inverse(hessian: Tensor, damp: Tensor) -> Tensor | None:
    """Returns ``U`` with ``U^T U = (H + damp I)^-1``, or None when it is not positive definite."""
    damped = hessian.clone()
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        return None
    return upper


ColumnTarget = Callable[[int, Tensor, "BlockwiseOBS"], Tensor]
"""``target(j, w, sweep) -> q``: the compressed value of column ``j`` given its current value
``w`` ``[out]``; it may look ahead with ``sweep.current`` and ``sweep.hinv``."""


class BlockwiseOBS:
    """One left-to-right OBS sweep over the columns of a weight, with lazy batch updates.

    For each column ``j`` the target gives ``q``; with ``d = U[j, j]`` the error
    ``e = (w - q) / d`` is spread onto the later columns: ``W[:, k] -= e * U[j, k]``.
    Inside a block of ``block_size`` columns this happens at once; the later blocks get
    the whole block's errors as one product when the block ends. The result equals the
    column-at-a-time algorithm with the full inverse.

    The constructor dampens and inverts ``H`` (:func:`damp_and_invert`) and zeroes the
    weight columns of dead inputs. Work happens on the weight's device, in float32, or in
    float64 when the weight or the Hessian is float64. A sweep runs once.

    Attributes:
        weight: the working copy, compressed in place by :meth:`run`.
        hinv: upper Cholesky factor of the damped ``H^-1``.
        dead: bool ``[in]``, the dead inputs.
        dampening_frac: the dampening fraction used.
        block: ``(first, last)`` columns of the current block.
        row_losses: ``[out]``, each row's share of the loss :meth:`run` returns (rows are
            compressed independently, so a sweep over stacked weights that share ``H``
            equals one sweep per weight).

    Args:
        weight: ``[out, in]`` in ``nn.Linear`` layout (not modified).
        hessian: ``H`` ``[in, in]`` of the layer's inputs (not modified).
        block_size: columns per lazy block.
        dampening_frac: dampening as a fraction of the mean diagonal of ``H``.

    Raises:
        ValueError: when the shapes do not fit or ``block_size < 1``.
        SingularHessianError: see :func:`damp_and_invert`.
    """

    def __init__(
        self, weight: Tensor, hessian: Tensor, block_size: int = 128, dampening_frac: float = 0.01
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
        inverse = damp_and_invert(hessian.to(device=weight.device, dtype=dtype), dampening_frac)
        self.hinv = inverse.upper
        self.dead = inverse.dead
        self.dampening_frac = inverse.dampening_frac
        self.block_size = block_size
        # Column-major working copy: row j of ``_columns`` is weight column j, contiguous.
        self._columns = weight.detach().to(dtype).T.clone(memory_format=torch.contiguous_format)
        self._columns[self.dead] = 0
        self.block = (0, 0)
        self._block_columns = self._columns[:0]
        self._block_errors = self._columns[:0]
        self.row_losses = self._columns.new_zeros(self._columns.shape[1])

    @property
    def weight(self) -> Tensor:
        """The working weight ``[out, in]`` (a view; compressed in place by :meth:`run`)."""
        return self._columns.T

    def current(self, start: int, stop: int) -> Tensor:
        """Returns the up-to-date values of columns ``[start, stop)``.

        Columns in the current block hold every update so far; later columns get the
        current block's pending errors applied here.

        Args:
            start: first column, at or after the column being compressed.
            stop: end of the range (clipped to the weight's width).

        Returns:
            ``[out, stop - start]``, a copy.
        """
        first, last = self.block
        inside = self._block_columns[start - first : min(stop, last) - first]
        if stop <= last:
            return inside.T.clone()
        pending = self.hinv[first:last, last:stop].T @ self._block_errors
        return torch.cat([inside, self._columns[last:stop] - pending]).T

    def run(self, target: ColumnTarget) -> tuple[Tensor, float]:
        """Compresses every column in order.

        Args:
            target: gives each column's compressed value (see :data:`ColumnTarget`).

        Returns:
            The compressed weight (working dtype) and the loss ``sum((w - q)^2 / d^2) / 2``,
            which equals ``tr(dW H dW^T) / 2`` for the damped ``H``, the mean squared output
            error per token when ``H`` comes from :class:`HessianAccumulator`.
        """
        width = self._columns.shape[0]
        for first in range(0, width, self.block_size):
            last = min(first + self.block_size, width)
            self.row_losses += self._run_block(first, last, target)
            later = self._columns[last:]
            later.addmm_(self.hinv[first:last, last:].T, self._block_errors, alpha=-1)
        return self.weight, self.row_losses.sum().item()

    def _run_block(self, first: int, last: int, target: ColumnTarget) -> Tensor:
        """Compresses columns ``[first, last)``, updating the block in place; returns the
        block's loss per row."""
        self.block = (first, last)
        self._block_columns = self._columns[first:last]
        self._block_errors = torch.zeros_like(self._block_columns)
        hinv = self.hinv[first:last, first:last]
        with _one_thread():  # tiny ops: intra-op threads would only add fork/join waits
            self._sweep_block(first, last, hinv, target)
        return self._block_errors.square().sum(dim=0) / 2

    def _sweep_block(self, first: int, last: int, hinv: Tensor, target: ColumnTarget) -> None:
        """The column loop of :meth:`_run_block`."""
        for i in range(last - first):
            w = self._block_columns[i]
            q = target(first + i, w.clone(), self)
            error = torch.sub(w, q, out=self._block_errors[i]).div_(hinv[i, i])
            self._block_columns[i + 1 :].addr_(hinv[i, i + 1 :], error, alpha=-1)
            w.copy_(q)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs the body with one intra-op thread, then restores the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""The reversed Cholesky factor of large Hessians in tiles, which several ranks can share.

GPTQ and SparseGPT sweep with ``R``, upper triangular, ``R R^T = H``
(:func:`reverse_cholesky`). A Hessian of :data:`TILED_FROM` inputs or more is factored here,
in column tiles of :data:`FACTOR_TILE` from the last to the first: each tile's diagonal block
is factored (LAPACK), the rows above it are solved against that (the panel). Before that, the
tile loses the contribution of every panel right of it in two products (left-looking): one for
all panels but the nearest, made while the nearest one is still being factored, and one for
the nearest, ``A[:j, j] -= R[:j, K] R[j, K]^T`` with ``K`` the panels' columns. Few large
products read the matrix far less often than one per pair of tiles (about a tenth less time
at 8192 inputs). Each operation's operands and shapes follow from the matrix's size alone, so
the factor is the same to the last bit whichever rank computes which tile. Inside
:func:`factoring_together` the ranks share the updates: tile ``j`` (counted from the last) is
updated on rank ``j % world_size``, which also factors its panel and broadcasts it; every
rank keeps every panel, so all end with the whole factor. On one CPU thread the tiles take
less time than LAPACK's one call on the reversed matrix, reversed back
(``benchmarks/solve_costs.py --factor``). Smaller Hessians, whose factorization costs less
than sharing it, stay one LAPACK call.

A row-sliced layer (``layerwise_split``) repeats its Hessian's factorization on each rank
holding a slice; factored together, each rank does about ``1 / world_size`` of it. Before each
factorization the ranks agree that none has failed (:class:`Together`): a rank whose own work
fails tells the others at their next agreement (:meth:`Together.give_up`), so they stop there
instead of waiting for its panels. A rank whose work fails inside a factorization goes on
taking part in its broadcasts up to its next panel, which tells the others instead of holding
the factor, and every rank stops there (or, after its last panel, at the next agreement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from lightning_compress.core.distributed import (
    AnotherRankFailedError,
    all_reduce_min_,
    is_distributed,
    rank_and_world_size,
    start_broadcast_,
)

__all__ = [
    "FACTOR_TILE",
    "TILED_FROM",
    "Together",
    "factoring_together",
    "reverse_cholesky",
    "reverse_cholesky_in_one_call",
]

FACTOR_TILE = 256
"""Columns per tile."""
TILED_FROM = 2048
"""The smallest Hessian (inputs) factored in tiles; smaller ones take one LAPACK call."""

_FACTORED, _NOT_POSITIVE_DEFINITE, _OWNER_FAILED = 1.0, 0.0, -1.0
"""What a panel's last row holds: its diagonal block factored, not positive definite, or its
owner's work failed (see ``_Tiles._locally``)."""

_TOGETHER: ContextVar[Together | None] = ContextVar("factoring_together", default=None)


class Together:
    """The ranks inside one :func:`factoring_together`, which agree before each tiled
    factorization (and wherever the caller calls :meth:`agree`) that none has failed.

    Every rank must make the same calls in the same order, until one fails: it calls
    :meth:`give_up` instead of its next agreement, and every rank stops at that one
    (the others raise :class:`AnotherRankFailedError` there). Inside a factorization, a
    rank's failure reaches the others through its next panel (``_Tiles._locally``).
    """

    def __init__(self) -> None:
        self.stopped = False

    def agree(self) -> None:
        """Waits until every rank is here or has given up.

        Raises:
            AnotherRankFailedError: when a rank gave up (or one had before).
        """
        if not self._all_ready(True):
            raise AnotherRankFailedError(
                "another rank failed while the ranks factored a Hessian together; its error "
                "is raised on every rank"
            )

    def give_up(self) -> None:
        """Tells the other ranks, at their next agreement, that this rank's work failed (once;
        nothing after the ranks stopped)."""
        self._all_ready(False)

    def _all_ready(self, ready: bool) -> bool:
        if self.stopped:
            return False
        if is_distributed():
            flag = all_reduce_min_(torch.tensor([int(ready)]))
            ready = bool(flag.item())
        self.stopped = not ready
        return ready


@contextmanager
def factoring_together() -> Iterator[Together]:
    """Inside, every rank shares each tiled factorization (a collective: every rank must
    factor the same matrices, in the same order).

    Yields:
        The ranks' :class:`Together`, for the caller's own agreements.
    """
    together = Together()
    token = _TOGETHER.set(together)
    try:
        yield together
    finally:
        _TOGETHER.reset(token)


def reverse_cholesky(matrix: Tensor, overwrite: bool = False) -> tuple[Tensor, bool]:
    """The upper triangular ``R`` with ``R R^T = matrix``: the Cholesky factor read backwards
    (with ``P`` the reversal permutation and ``P matrix P = L L^T``, ``R = P L P``).

    Only the upper triangle of ``matrix`` is read. ``matrix`` is not changed, unless
    ``overwrite`` lets a tiled factorization work in its memory (no copy of the matrix): then
    ``R`` is ``matrix`` itself, and after a failure ``matrix`` holds its values again,
    restored from its lower triangle (so it must be symmetric in both).

    Args:
        matrix: symmetric ``[n, n]``, float32 or float64.
        overwrite: whether ``matrix``'s memory may hold ``R``.

    Returns:
        ``R`` and whether the factorization succeeded (``matrix`` positive definite, every
        pivot's reciprocal finite); when it did not, the tensor returned holds no factor.

    Raises:
        AnotherRankFailedError: inside :func:`factoring_together`, when another rank failed.
    """
    if matrix.shape[0] < TILED_FROM:
        return reverse_cholesky_in_one_call(matrix)
    together = _TOGETHER.get()
    rank, world_size = (0, 1)
    if together is not None and is_distributed():
        rank, world_size = rank_and_world_size()
    tiles = _Tiles(matrix if overwrite else matrix.clone(), rank, world_size)
    if together is not None:
        together.agree()
    return tiles.factor()


def reverse_cholesky_in_one_call(matrix: Tensor) -> tuple[Tensor, bool]:
    """:func:`reverse_cholesky` in one LAPACK call on the reversed copy, reversed back (what
    a Hessian smaller than :data:`TILED_FROM` gets).

    Args:
        matrix: symmetric ``[n, n]``, float32 or float64.

    Returns:
        ``R`` and whether the factorization succeeded: positive definite, and no pivot whose
        reciprocal overflows (it would make every correction through it infinite).
    """
    lower, info = torch.linalg.cholesky_ex(matrix.flip(0, 1))
    invertible = bool(torch.isfinite(lower.diagonal().reciprocal()).all())
    return lower.flip(0, 1), info.item() == 0 and invertible


class _Tiles:
    """One tiled factorization of the symmetric ``matrix`` in its own memory, this rank's
    share of it.

    Columns are factored from the last tile to the first: tile ``k``'s diagonal block gives
    ``R_kk``, the rows above are solved against it (the panel). When panel ``k`` is taken,
    the owner of tile ``k + 1`` subtracts panel ``k``'s contribution from it, factors its
    panel and starts broadcasting it; then the owner of tile ``k + 2`` subtracts the
    contribution of panels ``0 .. k`` from that tile in one product, while panel ``k + 1``
    is on its way, so the other ranks find each panel ready instead of waiting while it is
    factored. Nothing is written below the diagonal blocks, so a failure restores the
    matrix from its lower triangle and a copy of the diagonal blocks; a success zeroes the
    lower triangle.
    """

    def __init__(self, matrix: Tensor, rank: int, world_size: int) -> None:
        self.upper, self.rank, self.world_size = matrix, rank, world_size
        size = matrix.shape[0]
        # from the last tile to the first (the first one may be narrower)
        stops = range(size, 0, -FACTOR_TILE)
        self.bounds = [(max(stop - FACTOR_TILE, 0), stop) for stop in stops]
        # allocated before the loop: two panels' memory, used in turn (one tile ahead), and
        # the diagonal blocks as they were
        self.panels = [matrix.new_empty((size + 1) * FACTOR_TILE) for _ in range(2)]
        self.diagonal_blocks = [
            matrix[first:last, first:last].clone() for first, last in self.bounds
        ]
        self.error: Exception | None = None

    def factor(self) -> tuple[Tensor, bool]:
        """Runs every step; returns the factor and whether it succeeded (if not, the matrix
        as it was).

        Raises:
            Exception: what this rank's own work raised; when sharing, only once this rank
                has told the others (see :meth:`_locally`).
            AnotherRankFailedError: when another rank's work failed.
        """
        count = len(self.bounds)
        pending = self._start_panel(0)
        for index in range(count):
            panel, wait = pending
            wait()
            state = panel[-1, 0].item()
            if state != _FACTORED:
                return self._stop(state)
            self._locally(self._take_panel, index, panel)
            following = index + 1
            if following < count:
                if self._owns(following):
                    self._locally(self._update, following, index, following)
                pending = self._start_panel(following)
            ahead = index + 2
            if ahead < count and self._owns(ahead):
                self._locally(self._update, ahead, 0, following)
        if self.error is not None:  # after its last panel: the others finish, then learn of
            raise self.error  # it at their next agreement
        return self.upper.triu_(), True

    def _locally(self, step: Callable[..., None], *args: int | Tensor) -> None:
        """Runs one of this rank's own steps. Alone, an error is raised at once. Sharing, the
        others would wait for this rank's next panel: the error is kept, this rank's work
        stops but it goes on taking part in the broadcasts, and its next panel carries
        :data:`_OWNER_FAILED` instead, at which every rank stops (this one raising its error,
        the others :class:`AnotherRankFailedError`)."""
        if self.error is not None:
            return
        try:
            step(*args)
        except Exception as err:
            if self.world_size == 1:
                raise
            self.error = err

    def _stop(self, state: float) -> tuple[Tensor, bool]:
        """After a panel that did not factor: this rank's own error, another rank's failure,
        or (a diagonal block not positive definite) the matrix restored and the failure."""
        if self.error is not None:
            raise self.error
        if state == _OWNER_FAILED:
            raise AnotherRankFailedError(
                "another rank failed while the ranks factored a Hessian together; its error "
                "is raised on every rank"
            )
        self._restore()
        return self.upper, False

    def _restore(self) -> None:
        """The matrix as it was: each tile's rows above its diagonal block from the columns
        left of it, below the diagonal (never written), and its diagonal block from the copy."""
        for (first, last), block in zip(self.bounds, self.diagonal_blocks, strict=True):
            self.upper[:first, first:last] = self.upper[first:last, :first].T
            self.upper[first:last, first:last] = block

    def _owns(self, tile: int) -> bool:
        return tile % self.world_size == self.rank

    def _start_panel(self, tile: int) -> tuple[Tensor, Callable[[], None]]:
        """Tile ``tile``'s panel (its columns from the top down to the diagonal, plus one row
        whose first value says how it went: :data:`_FACTORED` and the others), factored here
        if this rank owns the tile, and the wait for its broadcast."""
        first, last = self.bounds[tile]
        memory = self.panels[tile % 2]
        panel = memory[: (last + 1) * (last - first)].view(last + 1, last - first)
        owner = tile % self.world_size
        if owner == self.rank:
            panel[-1, 0] = _OWNER_FAILED
            self._locally(self._factor_own_panel, tile, panel)
        if self.world_size == 1:
            return panel, lambda: None
        return panel, start_broadcast_(panel, owner)

    def _factor_own_panel(self, tile: int, panel: Tensor) -> None:
        """Factors tile ``tile``'s panel into ``panel``, its last row saying whether it did."""
        first, last = self.bounds[tile]
        factored = _factor_panel(self.upper[:last, first:last], panel[:-1])
        panel[-1, 0] = _FACTORED if factored else _NOT_POSITIVE_DEFINITE

    def _take_panel(self, tile: int, panel: Tensor) -> None:
        """Writes tile ``tile``'s panel (factored here or received) into the factor."""
        first, last = self.bounds[tile]
        self.upper[:last, first:last] = panel[:-1]

    def _update(self, tile: int, first: int, stop: int) -> None:
        """Subtracts the contribution of panels ``first`` to ``stop - 1`` (adjacent columns)
        from the columns of tile ``tile``, in one product."""
        start, end = self.bounds[tile]
        left, right = self.bounds[stop - 1][0], self.bounds[first][1]
        block, rows = self.upper[:end, left:right], self.upper[start:end, left:right]
        self.upper[:end, start:end].addmm_(block, rows.T, alpha=-1)


def _factor_panel(columns: Tensor, out: Tensor) -> bool:
    """Factors the diagonal block of ``columns`` (a tile's columns from the top down to its
    diagonal, every later tile's update applied) and solves the rows above against it, into
    ``out``.

    Returns:
        Whether the diagonal block was positive definite.
    """
    width = columns.shape[1]
    above = columns.shape[0] - width
    diagonal, factored = reverse_cholesky_in_one_call(columns[above:])
    out[above:] = diagonal
    if above:  # R_above = A_above R_kk^-T, from a contiguous copy (the strided rows take
        # LAPACK's solve twice as long)
        out[:above] = torch.linalg.solve_triangular(
            diagonal.T, columns[:above].contiguous(), upper=False, left=False
        )
    return factored

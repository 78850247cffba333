"""Each layer's solve on one owner rank, its result shared with every rank.

Under several processes every rank holds the same reduced statistics after a block's
calibration, so solving every layer on every rank repeats the work N times. Instead
:func:`assign_owners` gives each layer one owner rank, balancing the estimated solve cost
(:func:`solve_cost`: the column sweep, the Cholesky factorization of the Hessian and its
triangular inverse); only the owner computes the layer, and :func:`share_outcomes`
broadcasts its result (the new weight and every buffer: scales, zero points, ``g_idx``) so
that all ranks end bit-identical. A failure on an owner reaches every rank as the same
error, before any broadcast, so no rank waits for a result that never comes.

A layer too costly for one rank (``down_proj`` is about half of a Llama block's solve) gets
its Hessian's inversion shared: the owner of its first part factors the damped Hessian and
sends the factor, and all ranks compute the factor's triangular inverse together
(:func:`shared_triangular_inverse`: the two half-size inverses on two ranks, the products
that join them cut by rows), bit for bit what one process computes. Where the method treats
rows independently (GPTQ, SparseGPT with N:M masks) the layer may also be split by rows:
each of its slices is solved on its own rank with the shared inverse, and
:func:`join_row_slices` puts the layer back together. Row slices (of a layer, and of the
inverse's products) start at multiples of :data:`ROW_ALIGN` rows, so each slice's rows sit
in the same SIMD lanes as in the whole products and reductions (which made the split
bit-identical to one sweep on the CPUs measured; a BLAS whose per-element rounding depends on
the matrix height could move a value that sits on a rounding tie, the ranks still ending
identical). :func:`compute_owned` runs a rank's parts: the shared inversions first, in the
same order on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_compress.core.distributed import (
    all_gather_or_raise,
    broadcast_,
    broadcast_tensors_,
    rank_and_world_size,
)
from lightning_compress.modifiers.hessian import (
    TRIANGULAR_BASE,
    factor_inverses_by,
    lower_triangular_inverse,
)

__all__ = [
    "CompressedLayer",
    "ROW_ALIGN",
    "OwnedStack",
    "StackOutcome",
    "assign_owners",
    "compute_owned",
    "help_invert",
    "join_row_slices",
    "row_bounds",
    "share_outcomes",
    "shared_triangular_inverse",
    "solve_cost",
]

ROW_ALIGN = 64
"""Row slices of a split layer (and of a shared inverse's products) start at multiples of
this many rows."""
PER_COLUMN = 2.0e6
"""The sweep's fixed work per column (its loop of small operations), in multiply-adds of its
products: 40 us a column against 18 ps a multiply-add, measured on one CPU thread."""
FACTOR = 0.5
"""The Cholesky factorization's cost per ``cols**3`` multiply-adds of the sweep (measured)."""
INVERSE = 0.4
"""The triangular inverse's cost per ``cols**3`` multiply-adds of the sweep (measured)."""
SHARING = 400.0
"""What sharing an inversion costs each rank per ``cols**2`` (sending the factor and the
inverse's pieces, and putting them together; measured over one machine's loopback)."""


@dataclass
class CompressedLayer:
    """One layer's compression, computed before the layer is changed.

    Args:
        weight: the compressed weight (same shape and dtype as the layer's).
        buffers: buffers the layer keeps (qparams), by name.
        loss: the method's reconstruction loss for the layer, where it has one.
    """

    weight: Tensor
    buffers: dict[str, Tensor] = field(default_factory=dict)
    loss: float | None = None


@dataclass
class StackOutcome:
    """What computing one stack of layers gave.

    Args:
        results: each layer's result, by name.
        seconds: the time spent per layer.
        fallback: why the stack fell back to the data-free method, or None.
    """

    results: dict[str, CompressedLayer]
    seconds: float
    fallback: str | None = None


class OwnedStack(NamedTuple):
    """Layers computed together, in one call, by one rank.

    Args:
        names: the layers (part or all of a stack).
        owner: the rank that computes them.
        rows: ``(start, stop)``: only these rows of the one layer in ``names``; None: whole.
        shared: whether all ranks invert their Hessian's factor together (the owner of the
            first part of ``names`` factors it).
    """

    names: list[str]
    owner: int
    rows: tuple[int, int] | None = None
    shared: bool = False


def solve_cost(rows: int, cols: int) -> float:
    """The estimated cost of a Hessian solve (GPTQ, SparseGPT) of a ``[rows, cols]`` weight
    on one rank: the column sweep, the Cholesky factorization and the triangular inverse.

    Args:
        rows: the weight's output rows.
        cols: its input columns.

    Returns:
        The cost, in multiply-adds of the sweep's products.
    """
    return _sweep_cost(rows, cols) + (FACTOR + INVERSE) * float(cols) ** 3


def _sweep_cost(rows: int, cols: int) -> float:
    """The column sweep of a ``[rows, cols]`` weight: its products and its per-column work."""
    return float(rows) * cols * cols + PER_COLUMN * cols


class _Unit(NamedTuple):
    """Layers owned together (part or all of a stack) and how they are computed."""

    stack: int
    names: list[str]
    slices: int = 1
    shared: bool = False


def assign_owners(
    stacks: Sequence[list[str]],
    shapes: Mapping[str, Sequence[int]],
    divisible: Callable[[list[str]], bool],
    world_size: int,
    row_divisible: Callable[[str], bool] = lambda name: False,
) -> list[OwnedStack]:
    """Splits ``stacks`` among the ranks, balancing the estimated cost.

    The layers of a divisible stack are assigned one by one; those of an indivisible stack
    together; the layers of one stack that land on one rank are computed there together, in
    the stack's order (one sweep, one inversion). Then, while it shortens the busiest rank's
    estimated time, the costliest part that can is changed one step: its inversion is shared
    by all ranks (the owner factors, each rank then pays ``1 / world_size`` of the inverse),
    then it is cut into one more row slice (a layer that ``row_divisible`` allows, at most
    ``world_size`` slices on distinct ranks, each at least :data:`ROW_ALIGN` rows; only the
    first slice's owner factors). The owners follow from the names and shapes alone, so every
    rank agrees without talking.

    Args:
        stacks: the stacks, in the order they would be computed.
        shapes: each layer's weight shape ``[rows, cols]``.
        divisible: whether the layers of a stack can be computed in separate calls with the
            results they get together.
        world_size: the number of ranks.
        row_divisible: whether a layer (alone in its part) may be computed in row slices.

    Returns:
        The parts and their owners: by stack, then by owner, then by rows.
    """
    units: list[_Unit] = []
    for index, stack in enumerate(stacks):
        parts = [[name] for name in stack] if divisible(stack) else [list(stack)]
        units.extend(_Unit(index, part) for part in parts)
    best = _pieces_and_owners(units, shapes, world_size)
    while world_size > 1:
        steps = _next_steps(units, best[1], shapes, world_size, row_divisible)
        tried = [
            (_pieces_and_owners(changed, shapes, world_size), changed)
            for changed in ([*units[:index], unit, *units[index + 1 :]] for index, unit in steps)
        ]
        if not tried or min(tried, key=lambda item: item[0][0])[0][0] >= best[0]:
            break
        best, units = min(tried, key=lambda item: item[0][0])
    grouped: dict[tuple[int, int, tuple[int, int] | None, bool], list[str]] = {}
    for piece, owner in best[1]:
        unit = units[piece.unit]
        grouped.setdefault((unit.stack, owner, piece.rows, unit.shared), []).extend(unit.names)
    order = sorted(grouped, key=lambda key: (key[0], key[1], key[2] or (0, 0)))
    return [OwnedStack(grouped[key], key[1], key[2], key[3]) for key in order]


class _Piece(NamedTuple):
    """A unit's rows (None: all) and its estimated cost on its owner."""

    unit: int
    rows: tuple[int, int] | None
    cost: float


def _pieces(units: Sequence[_Unit], shapes: Mapping[str, Sequence[int]]) -> list[_Piece]:
    """The units cut into their row slices; only a unit's first piece factors its Hessian,
    and the inverse is counted on it only where it is not shared."""
    pieces = []
    for index, unit in enumerate(units):
        rows, cols = _shape(unit, shapes)
        inversion = (FACTOR + (0.0 if unit.shared else INVERSE)) * float(cols) ** 3
        if unit.slices == 1:
            pieces.append(_Piece(index, None, _sweep_cost(rows, cols) + inversion))
            continue
        bounds = itertools.pairwise(row_bounds(rows, unit.slices))
        for i, (start, stop) in enumerate(bounds):
            cost = _sweep_cost(stop - start, cols) + (inversion if i == 0 else 0.0)
            pieces.append(_Piece(index, (start, stop), cost))
    return pieces


def _shape(unit: _Unit, shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """The rows and columns of ``unit``'s stacked weight."""
    return sum(shapes[name][0] for name in unit.names), shapes[unit.names[0]][1]


def _pieces_and_owners(
    units: Sequence[_Unit], shapes: Mapping[str, Sequence[int]], world_size: int
) -> tuple[float, list[tuple[_Piece, int]]]:
    """Cuts the units into pieces and assigns them, costliest first (ties: the earlier),
    each to the least loaded rank (ties: the lowest) that holds no other slice of its unit.

    Returns:
        The busiest rank's estimated cost (:func:`_busiest`) and each piece with its owner.
    """
    pieces = _pieces(units, shapes)
    loads = [0.0] * world_size
    owners = [0] * len(pieces)
    holders: dict[int, set[int]] = {}
    for index in sorted(range(len(pieces)), key=lambda i: (-pieces[i].cost, i)):
        taken = holders.setdefault(pieces[index].unit, set())
        rank = min(
            (rank for rank in range(world_size) if rank not in taken),
            key=lambda rank: (loads[rank], rank),
        )
        owners[index] = rank
        taken.add(rank)
        loads[rank] += pieces[index].cost
    assigned = list(zip(pieces, owners, strict=True))
    return _busiest(units, assigned, shapes, world_size), assigned


def _busiest(
    units: Sequence[_Unit],
    assigned: Sequence[tuple[_Piece, int]],
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
) -> float:
    """The busiest rank's estimated cost: the pieces of one stack that one rank computes in
    one call count one sweep of their rows and one inversion; each shared inversion (one per
    call, or per layer cut into slices) adds its share of the inverse and of the messages to
    every rank."""
    calls: dict[tuple[int, int, tuple[int, int] | None, bool], list[_Piece]] = {}
    for piece, owner in assigned:
        unit = units[piece.unit]
        calls.setdefault((unit.stack, owner, piece.rows, unit.shared), []).append(piece)
    loads = [0.0] * world_size
    common = 0.0
    for (_, owner, rows, shared), pieces in calls.items():
        cols = float(shapes[units[pieces[0].unit].names[0]][1])
        if shared and (rows is None or rows[0] == 0):
            common += INVERSE * cols**3 / world_size + SHARING * cols**2
        if len(pieces) == 1:
            loads[owner] += pieces[0].cost
            continue
        stacked = sum(_shape(units[piece.unit], shapes)[0] for piece in pieces)
        inversion = (FACTOR + (0.0 if shared else INVERSE)) * cols**3
        loads[owner] += _sweep_cost(stacked, int(cols)) + inversion
    return max(loads) + common


def _next_steps(
    units: Sequence[_Unit],
    assigned: Sequence[tuple[_Piece, int]],
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
    row_divisible: Callable[[str], bool],
) -> list[tuple[int, _Unit]]:
    """The changes of the unit of the costliest piece that can change: its inversion shared,
    without or with one more row slice; or (already shared) one more row slice. Empty when
    no unit can change."""
    for piece, _ in sorted(assigned, key=lambda item: (-item[0].cost, item[0].unit)):
        unit = units[piece.unit]
        rows = _shape(unit, shapes)[0]
        cuttable = len(unit.names) == 1 and row_divisible(unit.names[0])
        cut = cuttable and unit.slices < world_size and rows // ROW_ALIGN > unit.slices
        steps = [] if unit.shared else [unit._replace(shared=True)]
        if cut:
            steps.append(unit._replace(shared=True, slices=unit.slices + 1))
        if steps:
            return [(piece.unit, step) for step in steps]
    return []


def row_bounds(rows: int, count: int) -> list[int]:
    """Cuts ``rows`` into ``count`` near-equal slices starting at multiples of :data:`ROW_ALIGN`.

    Args:
        rows: the layer's rows.
        count: the number of slices (at most ``rows // ROW_ALIGN``).

    Returns:
        The ``count + 1`` bounds, from 0 to ``rows``, increasing.

    Raises:
        ValueError: when ``rows`` has fewer than ``count`` aligned starts.
    """
    if not 1 <= count <= max(rows // ROW_ALIGN, 1):
        raise ValueError(
            f"count={count!r} is invalid for {rows} rows: expected 1 to {rows // ROW_ALIGN}"
        )
    half = count * ROW_ALIGN // 2
    starts = [(rows * i + half) // (count * ROW_ALIGN) * ROW_ALIGN for i in range(count)]
    return [*starts, rows]


def join_row_slices(
    plan: Sequence[OwnedStack],
    outcomes: Sequence[StackOutcome],
    join: Callable[[str, list[CompressedLayer]], CompressedLayer],
) -> list[StackOutcome]:
    """Puts the row slices of split layers back together.

    Args:
        plan: the parts (:func:`assign_owners`).
        outcomes: their outcomes, in the order of ``plan``.
        join: the method's joining of one layer's slice results, in row order.

    Returns:
        The outcomes of the whole parts, then one per split layer (its time: the slices'
        sum). A split layer that fell back to the data-free method keeps its first slice's
        whole-layer result (every slice fell back alike: the Hessian decides).
    """
    whole = [outcome for part, outcome in zip(plan, outcomes, strict=True) if part.rows is None]
    sliced: dict[str, list[tuple[tuple[int, int], StackOutcome]]] = {}
    for part, outcome in zip(plan, outcomes, strict=True):
        if part.rows is not None:
            sliced.setdefault(part.names[0], []).append((part.rows, outcome))
    for name, parts in sliced.items():
        parts.sort(key=lambda item: item[0])
        seconds = sum(outcome.seconds for _, outcome in parts)
        first = parts[0][1]
        if first.fallback is not None:
            whole.append(StackOutcome(first.results, seconds, first.fallback))
            continue
        joined = join(name, [outcome.results[name] for _, outcome in parts])
        whole.append(StackOutcome({name: joined}, seconds))
    return whole


def share_outcomes(
    plan: Sequence[OwnedStack],
    local: Mapping[int, StackOutcome],
    error: Exception | None,
    devices: Mapping[str, torch.device],
) -> list[StackOutcome]:
    """Gives every rank the outcome of every part of ``plan`` (a collective call).

    First every rank learns whether some rank failed (then all raise that error) and the
    shapes of what the owners computed; then each owner broadcasts its tensors, bit for bit.

    Args:
        plan: the parts and owners (:func:`assign_owners`), the same on every rank.
        local: the outcomes this rank computed, by index in ``plan``.
        error: what this rank's computation raised, or None.
        devices: where each layer's received tensors go (its weight's device), by name.

    Returns:
        Each part's outcome, in the order of ``plan``.

    Raises:
        Exception: the error of the lowest rank that failed, on every rank.
    """
    rank, world_size = rank_and_world_size()
    summary = {index: _describe(outcome) for index, outcome in local.items()}
    described: dict[int, dict[str, Any]] = {}
    for part in all_gather_or_raise(summary, error):
        described.update(part)
    outcomes: dict[int, StackOutcome] = dict(local)
    for source in range(world_size):
        owned = [index for index, part in enumerate(plan) if part.owner == source]
        if source != rank:
            for index in owned:
                outcomes[index] = _placeholder(described[index], devices)
        tensors = [
            tensor
            for index in owned
            for result in outcomes[index].results.values()
            for tensor in (result.weight, *result.buffers.values())
        ]
        broadcast_tensors_(tensors, source)
    return [outcomes[index] for index in range(len(plan))]


def _describe(outcome: StackOutcome) -> dict[str, Any]:
    """What a receiving rank needs to hold ``outcome``'s tensors: shapes, dtypes, names."""
    return {
        "seconds": outcome.seconds,
        "fallback": outcome.fallback,
        "layers": {
            name: (
                result.loss,
                (tuple(result.weight.shape), result.weight.dtype),
                [(key, tuple(value.shape), value.dtype) for key, value in result.buffers.items()],
            )
            for name, result in outcome.results.items()
        },
    }


def _placeholder(described: dict[str, Any], devices: Mapping[str, torch.device]) -> StackOutcome:
    """An outcome with empty tensors of the described shapes, for the broadcast to fill."""
    results = {}
    for name, (loss, (shape, dtype), buffers) in described["layers"].items():
        device = devices[name]
        weight = torch.empty(shape, dtype=dtype, device=device)
        filled = {key: torch.empty(size, dtype=kind, device=device) for key, size, kind in buffers}
        results[name] = CompressedLayer(weight, filled, loss)
    return StackOutcome(results, described["seconds"], described["fallback"])


def compute_owned(
    plan: Sequence[OwnedStack],
    shapes: Mapping[str, Sequence[int]],
    devices: Mapping[str, torch.device],
    compute: Callable[[OwnedStack], StackOutcome],
) -> tuple[dict[int, StackOutcome], Exception | None]:
    """Computes this rank's parts of ``plan`` (a collective call: every rank calls it with the
    same plan).

    The parts whose inversion is shared run on every rank at once, in the order of ``plan``:
    the owner of a layer's first part factors its Hessian, the owners of its other slices
    receive the factor, and the other ranks :func:`help_invert`. A rank that waits for the
    first factorization computes its own other parts meanwhile, as many as the estimated
    time allows; the rest after the shared parts. After an error this rank computes nothing
    more but still helps, so that no rank waits for it.

    Args:
        plan: the parts and owners (:func:`assign_owners`), the same on every rank.
        shapes: each layer's weight shape ``[rows, cols]``.
        devices: each layer's device (where a helping rank inverts), by name.
        compute: computes one part (its inversion goes through
            :func:`~lightning_compress.modifiers.hessian.damp_and_invert`).

    Returns:
        The outcomes this rank computed, by index in ``plan``, and the error it hit or None
        (for :func:`share_outcomes`).
    """
    rank, _ = rank_and_world_size()
    units = _shared_units(plan)
    own = [i for i, part in enumerate(plan) if part.owner == rank and not part.shared]
    early = _while_waiting(plan, units, own, shapes, rank)
    local: dict[int, StackOutcome] = {}
    error: Exception | None = None
    for index in early:
        error = error or _compute_into(local, index, plan[index], compute)
    for indices in units:
        root = plan[indices[0]].owner
        inversion = _SharedInversion(root, devices[plan[indices[0]].names[0]])
        mine = [index for index in indices if plan[index].owner == rank]
        failed = True
        if mine and error is None:
            role = inversion.as_root if rank == root else inversion.as_receiver
            with factor_inverses_by(role):
                error = _compute_into(local, mine[0], plan[mine[0]], compute)
            failed = error is not None or mine[0] not in local
        if rank == root:
            inversion.finish(failed)
        else:
            help_invert(inversion)
    for index in own:
        if index not in early and error is None:
            error = _compute_into(local, index, plan[index], compute)
    return local, error


def _compute_into(
    local: dict[int, StackOutcome],
    index: int,
    part: OwnedStack,
    compute: Callable[[OwnedStack], StackOutcome],
) -> Exception | None:
    """Computes ``part`` into ``local[index]``; returns the error it raised, or None (also
    when the root of its shared inversion stopped: the root's error reaches every rank)."""
    try:
        local[index] = compute(part)
    except _RootStopped:
        return None
    except Exception as err:
        return err
    return None


def _while_waiting(
    plan: Sequence[OwnedStack],
    units: Sequence[list[int]],
    own: Sequence[int],
    shapes: Mapping[str, Sequence[int]],
    rank: int,
) -> list[int]:
    """This rank's parts (from ``own``, in order) that fit in the estimated time the root of
    the first shared inversion takes to factor its Hessian; none on that root."""
    if not units or plan[units[0][0]].owner == rank:
        return []
    budget = FACTOR * float(shapes[plan[units[0][0]].names[0]][1]) ** 3
    early = []
    for index in own:
        part = plan[index]
        rows = sum(shapes[name][0] for name in part.names)
        if part.rows is not None:
            rows = part.rows[1] - part.rows[0]
        budget -= solve_cost(rows, shapes[part.names[0]][1])
        if budget < 0:
            break
        early.append(index)
    return early


def _shared_units(plan: Sequence[OwnedStack]) -> list[list[int]]:
    """The parts of ``plan`` whose inversion is shared, by layer (its slices together, the
    first slice first), in the order of ``plan``."""
    units: dict[tuple[str, ...], list[int]] = {}
    for index, part in enumerate(plan):
        if part.shared:
            key = (part.names[0],) if part.rows is not None else tuple(part.names)
            units.setdefault(key, []).append(index)
    ordered = [sorted(indices, key=lambda i: plan[i].rows or (0, 0)) for indices in units.values()]
    return sorted(ordered, key=min)


class _RootStopped(RuntimeError):
    """The root of a shared inversion stopped (it failed) before this rank's inversion."""


_DONE, _ABORTED, _SINGULAR, _FACTORED = range(4)
_DTYPES = (torch.float32, torch.float64)


class _SharedInversion:
    """The inversions of one layer's Hessian, shared by all ranks.

    For each damped Hessian its solve inverts, the root factors it (Cholesky) and announces
    the outcome; after a factorization every rank computes the inverse with
    :func:`shared_triangular_inverse`. When its solve is over, the root says so.

    Args:
        root: the rank that factors (the owner of the layer's first part).
        device: where a helping rank computes.
    """

    def __init__(self, root: int, device: torch.device) -> None:
        self.root = root
        self.device = device
        self.finished = False
        """Whether the root's end of its solve was heard."""

    def as_root(self, matrix: Tensor) -> Tensor | None:
        """The root's ``L^-1`` of ``matrix`` (for ``factor_inverses_by``)."""
        lower, info = torch.linalg.cholesky_ex(matrix)
        factored = info.item() == 0
        self._announce(_FACTORED if factored else _SINGULAR, matrix.shape[0], matrix.dtype)
        return shared_triangular_inverse(lower, self.root) if factored else None

    def as_receiver(self, matrix: Tensor) -> Tensor | None:
        """``L^-1`` of ``matrix`` on an owner of another slice (for ``factor_inverses_by``).

        Raises:
            _RootStopped: when the root stopped before this inversion.
            RuntimeError: when the root inverted another matrix (the ranks disagree).
        """
        code, size, dtype = self._heard()
        if code in (_DONE, _ABORTED):
            self.finished = True
            if code == _ABORTED:
                raise _RootStopped(f"rank {self.root} failed before inverting")
            raise RuntimeError(
                f"rank {self.root} finished its solve without the inversion of this slice: "
                "the ranks disagree on the layer's Hessian"
            )
        inverse = None
        if code == _FACTORED:  # taken part in even when it does not fit, so no rank waits
            inverse = shared_triangular_inverse(matrix.new_empty(0, dtype=dtype), self.root)
        if (size, dtype) != (matrix.shape[0], matrix.dtype):
            raise RuntimeError(
                f"rank {self.root} inverted a {size} x {size} {dtype} factor, this rank a "
                f"{matrix.shape[0]} x {matrix.shape[0]} {matrix.dtype} one: the ranks disagree"
            )
        return inverse

    def finish(self, failed: bool) -> None:
        """On the root: tells the others that its solve is over.

        Args:
            failed: whether it failed (or was skipped after an earlier failure).
        """
        self._announce(_ABORTED if failed else _DONE, 0, torch.float32)

    def _announce(self, code: int, size: int, dtype: torch.dtype) -> None:
        header = torch.tensor([code, size, _DTYPES.index(dtype)], dtype=torch.int64)
        broadcast_tensors_([header], self.root)

    def _heard(self) -> tuple[int, int, torch.dtype]:
        header = torch.empty(3, dtype=torch.int64)
        broadcast_tensors_([header], self.root)
        code, size, dtype = header.tolist()
        return code, size, _DTYPES[dtype]


def help_invert(inversion: _SharedInversion) -> None:
    """Takes part in the inversions of ``inversion``'s root until its solve is over (on a
    rank that does not use the inverse: the results are dropped).

    Args:
        inversion: the shared inversion.
    """
    while not inversion.finished:
        code, size, dtype = inversion._heard()
        if code in (_DONE, _ABORTED):
            inversion.finished = True
        if code == _FACTORED:
            shared_triangular_inverse(
                torch.empty(0, dtype=dtype, device=inversion.device), inversion.root
            )


def shared_triangular_inverse(lower: Tensor, root: int) -> Tensor:
    """:func:`~lightning_compress.modifiers.hessian.lower_triangular_inverse` of ``lower``,
    bit for bit, computed by all ranks together (a collective call).

    ``root`` sends ``L`` and inverts the upper half of its diagonal, the next rank the lower
    half; the two products that join them, ``C A^-1`` and ``D^-1 (C A^-1)``, are cut into
    row slices on :data:`ROW_ALIGN` rows, one per rank, each sent to all. Matrices travel in
    their memory layout (a Cholesky factor is column-major), so no rank copies them first.

    Args:
        lower: ``L`` ``[n, n]`` on ``root``; elsewhere any tensor of its dtype and device
            (``L`` is received).
        root: the rank that holds ``L``.

    Returns:
        ``L^-1`` on every rank.
    """
    rank, world_size = rank_and_world_size()
    lower = _sent_from(root, lower, lower)
    size = lower.shape[0]
    if size <= TRIANGULAR_BASE:
        inverse = lower_triangular_inverse(lower) if rank == root else None
        return _sent_from(root, inverse, lower)
    half, partner = size // 2, (root + 1) % world_size
    upper_left, lower_right = lower[:half, :half], lower[half:, half:]
    first = lower_triangular_inverse(upper_left) if rank == root else None
    second = lower_triangular_inverse(lower_right) if rank == partner else None
    first = _sent_from(root, first, upper_left)
    second = _sent_from(partner, second, lower_right)
    product = _by_rows(lower[half:, :half], first)
    joined = _by_rows(second, product)
    inverse = torch.zeros_like(lower)
    inverse[:half, :half] = first
    inverse[half:, half:] = second
    inverse[half:, :half] = joined.neg_()
    return inverse


def _sent_from(source: int, matrix: Tensor | None, like: Tensor) -> Tensor:
    """Rank ``source``'s ``matrix`` (shaped like ``like``) on every rank, in its row- or
    column-major layout (another layout is made row-major), without a copy on ``source``."""
    rank, _ = rank_and_world_size()
    layout = torch.zeros(3, dtype=torch.int64)
    if rank == source:
        column_major = not matrix.is_contiguous() and matrix.mT.is_contiguous()
        matrix = matrix if column_major else matrix.contiguous()
        layout[:] = torch.tensor([int(column_major), *matrix.shape])
    broadcast_(layout, source)
    column_major, rows, cols = layout.tolist()
    if rank != source:
        shape = (cols, rows) if column_major else (rows, cols)
        buffer = like.new_empty(shape)
        matrix = buffer.mT if column_major else buffer
    broadcast_(matrix.mT if column_major else matrix, source)
    return matrix


def _by_rows(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` by row slices on :data:`ROW_ALIGN` rows, slice ``i`` computed by rank
    ``i`` and sent to all."""
    rank, world_size = rank_and_world_size()
    rows = left.shape[0]
    out = left.new_empty(rows, right.shape[1])
    bounds = row_bounds(rows, min(world_size, max(rows // ROW_ALIGN, 1)))
    for source, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if rank == source:
            torch.mm(left[start:stop], right, out=out[start:stop])
        broadcast_(out[start:stop], source)
    return out

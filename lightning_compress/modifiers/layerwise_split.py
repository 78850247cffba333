"""Each layer's solve on one owner rank, its result shared with every rank.

Under several processes every rank holds the same reduced statistics after a block's
calibration, so solving every layer on every rank repeats the work N times. Instead
:func:`assign_owners` gives each layer one owner rank, balancing the estimated solve time
(:func:`solve_cost`: what one call costs whatever its rows, the Hessian made ready and
factored, plus the column sweep's cost per row); only the owner computes the layer, and
:func:`share_outcomes` broadcasts its result (the new weight and every buffer: scales, zero
points, ``g_idx``) so that all ranks end bit-identical. A failure on an owner reaches every
rank as the same error, before any broadcast, so no rank waits for a result that never comes.

Layers that share a Hessian (``q/k/v_proj``, ``gate/up_proj``) and land on one rank are
solved there in one call, factoring the Hessian once: a stack is split between ranks only
where the estimate says the repeated factorization pays. A layer too costly for one rank is split
by rows, where the method treats rows independently (GPTQ, SparseGPT with N:M masks): one
slice on every rank, each rank repeating the call's fixed steps but factoring the Hessian
together with the others where it is large enough for tiles
(:mod:`~lightning_compress.modifiers.tiled_cholesky`), and :func:`join_row_slices` puts the
layer back together. Every rank solves its slices first, in plan order, since factoring
together is a collective; what a solve checks before it factors depends on the Hessian and the
layer's settings alone, so such a failure happens on all ranks alike. Slices start at multiples of
:data:`ROW_ALIGN` rows, so each slice's rows sit in the same SIMD lanes as in the whole
layer's products and reductions (which made the split bit-identical to one sweep on the CPUs
measured; a BLAS whose per-element rounding depends on the matrix width could move a value
that sits on a rounding tie, the ranks still ending identical).
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
    balanced_owners,
    broadcast_tensors_,
    rank_and_world_size,
)
from lightning_compress.modifiers.tiled_cholesky import TILED_FROM

__all__ = [
    "CompressedLayer",
    "ROW_ALIGN",
    "OwnedStack",
    "StackOutcome",
    "assign_owners",
    "call_cost",
    "join_row_slices",
    "plan_load",
    "row_bounds",
    "row_cost",
    "share_outcomes",
    "solve_cost",
]

ROW_ALIGN = 64
"""Row slices of a split layer start at multiples of this many rows."""

# The terms of one GPTQ W4 g128 call's CPU time on one thread (torch 2.13, AMD EPYC with
# AVX-512, fitted to 24 shapes from 128 x 512 to 2048 x 8192 within 20%: `python
# benchmarks/solve_costs.py`), in seconds per operation counted. SparseGPT's calls have the
# same parts; on an accelerator the proportions differ, so the balance is less even there (the
# owners still follow from the shapes alone).
HESSIAN_SECONDS = 7.3e-9
"""Per Hessian entry (``cols**2``): materializing the reduced float64 sum, converting,
permuting (activation order) and checking it."""
COLUMN_SECONDS = 2.3e-5
"""Per input column (``cols``): the sweep's small operations on each column, whatever the
rows (their dispatch, not their arithmetic, dominates)."""
FACTORIZATION_SECONDS = 6.0e-12
"""Per ``cols**3``: the Cholesky factorization (nothing is inverted: see ``BlockwiseOBS``)."""
PRODUCT_SECONDS = 1.5e-11
"""Per ``rows * cols**2``: the multiply-adds of the sweep's lazy batch updates."""
ELEMENT_SECONDS = 1.8e-8
"""Per ``rows * cols``: the sweep's work on each weight (compressing it, the rank-one
updates inside a block), in small operations whose overhead dominates."""


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
    """

    names: list[str]
    owner: int
    rows: tuple[int, int] | None = None


def call_cost(cols: int, sharing: int = 1) -> float:
    """The part of a Hessian solve's estimated time that one call pays whatever its rows:
    making the ``[cols, cols]`` Hessian ready, factoring it and the sweep's per-column steps.

    Args:
        cols: the weight's input columns.
        sharing: the ranks that factor the Hessian together (the slices of a row-sliced
            layer); a Hessian smaller than :data:`TILED_FROM` is factored by each alone.

    Returns:
        The estimated seconds on one CPU thread.
    """
    factorization = FACTORIZATION_SECONDS * float(cols) ** 3
    if cols >= TILED_FROM:
        factorization /= sharing
    return COLUMN_SECONDS * cols + HESSIAN_SECONDS * float(cols) ** 2 + factorization


def row_cost(cols: int) -> float:
    """The column sweep's estimated time per weight row (rows are swept independently).

    Args:
        cols: the weight's input columns.

    Returns:
        The estimated seconds per row on one CPU thread.
    """
    return PRODUCT_SECONDS * float(cols) ** 2 + ELEMENT_SECONDS * cols


def solve_cost(rows: int, cols: int, sharing: int = 1) -> float:
    """The estimated time of one Hessian solve (GPTQ, SparseGPT) call on a ``[rows, cols]``
    weight: :func:`call_cost` plus ``rows`` times :func:`row_cost`.

    Measured on one CPU thread, a call's fixed part dominates: ``down_proj`` of the bundled
    benchmark decoder (1024 x 2816) takes about 0.39 s, 0.25 s with 128 rows.

    Args:
        rows: the weight's output rows (of the layers stacked in the call).
        cols: its input columns.
        sharing: as :func:`call_cost`.

    Returns:
        The estimated seconds on one CPU thread.
    """
    return call_cost(cols, sharing) + rows * row_cost(cols)


def assign_owners(
    stacks: Sequence[list[str]],
    shapes: Mapping[str, Sequence[int]],
    divisible: Callable[[list[str]], bool],
    world_size: int,
    row_divisible: Callable[[str], bool] = lambda name: False,
) -> list[OwnedStack]:
    """Splits ``stacks`` among the ranks, balancing the estimated time (:func:`solve_cost`).

    The layers of a divisible stack are assigned one by one, those of an indivisible stack
    together, costliest first, each to the rank where the busiest-so-far load it makes is
    lowest: a layer joining a part of its stack already on a rank adds only its rows' cost
    there (the layers of one stack on one rank are computed together, in the stack's order:
    one Hessian made ready and factored), elsewhere also :func:`call_cost`. Then, while it
    shortens the busiest rank's estimated time, the costliest layer that ``row_divisible``
    allows is cut into ``world_size`` row slices (each at least :data:`ROW_ALIGN` rows),
    slice ``i`` on rank ``i``: each slice is its own call, the ranks factoring its Hessian
    together (:func:`call_cost` with ``sharing``). Where keeping every stack whole balances as well,
    stacks stay whole. The owners follow from the names and shapes alone, so every rank
    agrees without talking.

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
    whole = [(index, list(stack)) for index, stack in enumerate(stacks)]
    units: list[tuple[int, list[str]]] = []  # (stack index, layers owned together)
    for index, stack in enumerate(stacks):
        parts = [[name] for name in stack] if divisible(stack) else [list(stack)]
        units.extend((index, part) for part in parts)
    _, owned = min(
        _cut_while_it_pays(whole, shapes, world_size, row_divisible),
        _cut_while_it_pays(units, shapes, world_size, row_divisible),
        key=lambda item: item[0],
    )
    grouped: dict[tuple[int, int, tuple[int, int] | None], list[str]] = {}
    for (index, part, rows), owner in owned:
        grouped.setdefault((index, owner, rows), []).extend(part)
    order = sorted(grouped, key=lambda key: (key[0], key[1], key[2] or (0, 0)))
    return [OwnedStack(grouped[key], key[1], key[2]) for key in order]


def plan_load(
    plan: Sequence[OwnedStack], shapes: Mapping[str, Sequence[int]], world_size: int
) -> float:
    """The busiest rank's estimated solve time under ``plan``, each part one call (a row
    slice's Hessian factored by all ranks together).

    Args:
        plan: what :func:`assign_owners` returns (or any parts with owners).
        shapes: each layer's weight shape ``[rows, cols]``.
        world_size: the number of ranks.

    Returns:
        The largest sum of :func:`solve_cost` over one rank's parts.
    """
    loads = [0.0] * world_size
    for part in plan:
        rows = sum(shapes[name][0] for name in part.names)
        sharing = 1
        if part.rows is not None:
            rows, sharing = part.rows[1] - part.rows[0], world_size
        loads[part.owner] += solve_cost(rows, shapes[part.names[0]][1], sharing)
    return max(loads)


_Piece = tuple[int, list[str], tuple[int, int] | None]
"""A stack index, the layers owned together and their row slice (None: whole)."""


def _pieces_and_owners(
    units: Sequence[tuple[int, list[str]]],
    slices: Sequence[int],
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
) -> tuple[float, list[tuple[_Piece, int]]]:
    """Cuts each unit into its number of row slices (1 or ``world_size``), slice ``i`` on
    rank ``i``, and assigns the whole pieces (:func:`balanced_owners`) around them: the
    whole pieces of a stack on one rank pay its call's cost (:func:`call_cost`) once there,
    each row slice its own (its factorization shared).

    Returns:
        The busiest rank's estimated time and each piece with its owner.
    """
    sliced: list[tuple[_Piece, int]] = []
    whole: list[_Piece] = []
    loads = [0.0] * world_size
    for (index, part), count in zip(units, slices, strict=True):
        rows, cols = sum(shapes[name][0] for name in part), shapes[part[0]][1]
        if count == 1:
            whole.append((index, part, None))
            continue
        for owner, bound in enumerate(itertools.pairwise(row_bounds(rows, count))):
            sliced.append(((index, part, bound), owner))
            loads[owner] += solve_cost(bound[1] - bound[0], cols, count)
    costs, keys, shared = [], [], {}
    for index, part, _ in whole:  # the layers of one stack on one rank: one call
        cols = shapes[part[0]][1]
        costs.append(sum(shapes[name][0] for name in part) * row_cost(cols))
        keys.append(index)
        shared[index] = call_cost(cols)
    owners = balanced_owners(costs, world_size, keys, shared, loads)
    for owner, cost in zip(owners, costs, strict=True):
        loads[owner] += cost
    for index, owner in set(zip(keys, owners, strict=True)):
        loads[owner] += shared[index]
    return max(loads), [*sliced, *zip(whole, owners, strict=True)]


def _cut_while_it_pays(
    units: Sequence[tuple[int, list[str]]],
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
    row_divisible: Callable[[str], bool],
) -> tuple[float, list[tuple[_Piece, int]]]:
    """:func:`_pieces_and_owners` of ``units``, with the costliest units cut into row slices
    one after the other while that lowers the busiest rank's estimated time."""
    slices = [1] * len(units)
    best_load, owned = _pieces_and_owners(units, slices, shapes, world_size)
    while (cut := _next_cut(units, slices, shapes, world_size, row_divisible)) is not None:
        slices[cut] = world_size
        load, tried = _pieces_and_owners(units, slices, shapes, world_size)
        if load >= best_load:
            break
        best_load, owned = load, tried
    return best_load, owned


def _next_cut(
    units: Sequence[tuple[int, list[str]]],
    slices: Sequence[int],
    shapes: Mapping[str, Sequence[int]],
    world_size: int,
    row_divisible: Callable[[str], bool],
) -> int | None:
    """The costliest unit not yet cut that can be cut into ``world_size`` slices, or None."""
    best, chosen = -1.0, None
    for unit, ((_, part), count) in enumerate(zip(units, slices, strict=True)):
        rows, cols = shapes[part[0]]
        fits = count == 1 < world_size <= rows // ROW_ALIGN
        if len(part) != 1 or not fits or not row_divisible(part[0]):
            continue
        cost = solve_cost(rows, cols)
        if cost > best:
            best, chosen = cost, unit
    return chosen


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

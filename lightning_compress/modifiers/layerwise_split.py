"""Each layer's solve on one owner rank, its result shared with every rank.

Under several processes every rank holds the same reduced statistics after a block's
calibration, so solving every layer on every rank repeats the work N times. Instead
:func:`assign_owners` gives each layer one owner rank, balancing the estimated solve cost
(``rows * cols**2 + cols**3`` for a Hessian solve); only the owner computes the layer, and
:func:`share_outcomes` broadcasts its result (the new weight and every buffer: scales, zero
points, ``g_idx``) so that all ranks end bit-identical. A failure on an owner reaches every
rank as the same error, before any broadcast, so no rank waits for a result that never comes.
"""

from __future__ import annotations

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

__all__ = [
    "CompressedLayer",
    "OwnedStack",
    "StackOutcome",
    "assign_owners",
    "share_outcomes",
    "solve_cost",
]


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
    """

    names: list[str]
    owner: int


def solve_cost(rows: int, cols: int) -> float:
    """The estimated cost of a Hessian solve (GPTQ, SparseGPT) of a ``[rows, cols]`` weight:
    the column sweep (``rows * cols**2``) and the inversion of the Hessian (``cols**3``).

    Args:
        rows: the weight's output rows.
        cols: its input columns.

    Returns:
        The cost, in multiply-adds up to a constant.
    """
    return float(rows) * cols * cols + float(cols) ** 3


def assign_owners(
    stacks: Sequence[list[str]],
    shapes: Mapping[str, Sequence[int]],
    divisible: Callable[[list[str]], bool],
    world_size: int,
) -> list[OwnedStack]:
    """Splits ``stacks`` among the ranks, balancing the estimated cost.

    The layers of a divisible stack are assigned one by one (each costing
    :func:`solve_cost` of its own weight); those of an indivisible stack together. The layers
    of one stack that land on one rank are computed there together, in the stack's order.
    The owners follow from the names and shapes alone, so every rank agrees without talking.

    Args:
        stacks: the stacks, in the order they would be computed.
        shapes: each layer's weight shape ``[rows, cols]``.
        divisible: whether the layers of a stack can be computed in separate calls with the
            results they get together.
        world_size: the number of ranks.

    Returns:
        The parts and their owners: by stack, then by owner.
    """
    units: list[tuple[int, list[str]]] = []  # (stack index, layers owned together)
    for index, stack in enumerate(stacks):
        parts = [[name] for name in stack] if divisible(stack) else [list(stack)]
        units.extend((index, part) for part in parts)
    costs = [
        solve_cost(sum(shapes[name][0] for name in part), shapes[part[0]][1]) for _, part in units
    ]
    owners = balanced_owners(costs, world_size)
    grouped: dict[tuple[int, int], list[str]] = {}
    for (index, part), owner in zip(units, owners, strict=True):
        grouped.setdefault((index, owner), []).extend(part)
    return [OwnedStack(names, owner) for (_, owner), names in sorted(grouped.items())]


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

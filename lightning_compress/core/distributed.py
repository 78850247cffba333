"""Reduction helpers that modifiers call so every rank compresses with the same statistics.

Calibration under several processes (Lightning DDP, ``torchrun``) gives each rank a shard of
the data. A modifier accumulates its statistics locally during the calibration forwards and,
at ``SEQUENTIAL_EPOCH_END`` (or ``CALIBRATION_EPOCH_END``), reduces them across ranks *before*
it compresses, so every rank computes the same compressed weights as one process that saw all
the data. Outside ``torch.distributed`` every helper is a no-op, so modifiers call them
unconditionally.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "AnotherRankFailedError",
    "ShardSampler",
    "all_gather_or_raise",
    "all_reduce_max_",
    "all_reduce_min_",
    "all_reduce_sum_",
    "balanced_owners",
    "broadcast_",
    "broadcast_tensors_",
    "check_same_on_all_ranks",
    "is_distributed",
    "rank_and_world_size",
    "start_broadcast_",
]


class AnotherRankFailedError(RuntimeError):
    """Raised on a rank that learns, in a collective step, that another rank failed before it;
    :func:`all_gather_or_raise` replaces it with that rank's own error."""


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running.

    Returns:
        True under ``torch.distributed`` with a world size above one.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place.

    Args:
        tensor: this rank's partial statistic (any device the backend can reach).

    Returns:
        ``tensor``, now holding the sum.
    """
    return _all_reduce_(tensor, dist.ReduceOp.SUM)


def all_reduce_min_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``tensor`` over all ranks, in place.

    Args:
        tensor: this rank's statistic (e.g. an observer's running minimum).

    Returns:
        ``tensor``, now holding the minimum.
    """
    return _all_reduce_(tensor, dist.ReduceOp.MIN)


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place.

    Args:
        tensor: this rank's statistic (e.g. an observer's running maximum).

    Returns:
        ``tensor``, now holding the maximum.
    """
    return _all_reduce_(tensor, dist.ReduceOp.MAX)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value, in place.

    Use it when one rank decides (a random choice, a column order) and the others follow.

    Args:
        tensor: the tensor to send (on ``src``) or to fill (elsewhere).
        src: the rank that sends.

    Returns:
        ``tensor``, now holding ``src``'s value.
    """
    if not is_distributed():
        return tensor
    with _on_backend_device(tensor) as buffer:
        dist.broadcast(buffer, src=src)
    return tensor


def start_broadcast_(tensor: torch.Tensor, src: int) -> Callable[[], None]:
    """Start overwriting ``tensor`` on every rank with rank ``src``'s value; return the wait.

    Computation may go on until the returned function is called; ``tensor`` must not be
    read (elsewhere) or changed (on ``src``) before then. Every rank starts its broadcasts
    in the same order. A tensor off the backend's device travels at once (no overlap).

    Args:
        tensor: the tensor to send (on ``src``) or to fill (elsewhere), contiguous.
        src: the rank that sends.

    Returns:
        What waits until ``tensor`` holds ``src``'s value.
    """
    if not is_distributed() or tensor.device != _backend_device():
        broadcast_(tensor, src)
        return lambda: None
    work = dist.broadcast(tensor, src=src, async_op=True)
    return work.wait


DIRECT_BYTES = 2**20
"""Tensors of at least this size travel in a broadcast of their own, in place; smaller ones
are packed into one."""


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s, bit for bit.

    Each tensor travels as its bytes, so any dtype (float8, bool, int) does. Tensors of
    :data:`DIRECT_BYTES` or more are broadcast one by one in their own memory (through a
    copy only where a tensor is not contiguous on the backend's device); the smaller ones
    together, in one buffer of their bytes.

    Args:
        tensors: on ``src`` the values to send; elsewhere tensors of the same shapes and
            dtypes, in the same order, to fill (any device; contiguous or not).
        src: the rank that sends.
    """
    if not is_distributed() or not tensors:
        return
    rank, _ = rank_and_world_size()
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    small = [tensor for tensor, size in zip(tensors, sizes, strict=True) if size < DIRECT_BYTES]
    for tensor, size in zip(tensors, sizes, strict=True):
        if size >= DIRECT_BYTES:
            _broadcast_in_place(tensor, src, rank == src)
    if small:
        _broadcast_packed(small, src, rank == src)


def _broadcast_in_place(tensor: torch.Tensor, src: int, sending: bool) -> None:
    """One tensor's bytes broadcast from ``src``, in its own memory where it can be."""
    device = _backend_device()
    direct = tensor.device == device and tensor.is_contiguous()
    buffer = tensor.detach() if direct else tensor.detach().contiguous().to(device)
    dist.broadcast(buffer.reshape(-1).view(torch.uint8), src=src)
    if not direct and not sending:
        with torch.no_grad():
            tensor.copy_(buffer)


def _broadcast_packed(tensors: list[torch.Tensor], src: int, sending: bool) -> None:
    """Small tensors broadcast from ``src`` as one buffer of their bytes."""
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    device = _backend_device()
    if sending:
        packed = torch.cat([_bytes_of(tensor).to(device) for tensor in tensors])
    else:
        packed = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(packed, src=src)
    if sending:
        return
    for tensor, part in zip(tensors, packed.split(sizes), strict=True):
        received = part.clone().view(tensor.dtype).reshape(tensor.shape)  # clone: aligned
        with torch.no_grad():
            tensor.copy_(received)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor``'s values, in row-major order, as a flat uint8 tensor."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def balanced_owners(
    costs: Sequence[float],
    world_size: int,
    keys: Sequence[Hashable | None] | None = None,
    shared: Mapping[Hashable, float] | None = None,
    loads: Sequence[float] | None = None,
) -> list[int]:
    """One owner rank per task, balancing the total cost.

    Tasks may share work: each task with a key needs that key's ``shared`` cost paid once on
    its rank, whatever the number of tasks with the key there (layers solved in one call
    share one Hessian inversion). Tasks are taken from the costliest, their own cost plus
    their key's (greedy longest processing time; ties: the earlier task), each going to the
    rank whose load it leaves lowest (ties: the lowest rank); then, while it lowers the
    busiest rank's load, one task of the busiest rank moves to the rank where that helps
    most (ties: the earlier task, the lower rank). The result depends on the arguments alone,
    so every rank computes the same owners without talking.

    Args:
        costs: each task's own estimated cost (>= 0).
        world_size: the number of ranks (>= 1).
        keys: per task, the key of the work it shares, or None; None: no task shares work.
        shared: the cost of each key's work (>= 0).
        loads: each rank's load before these tasks (work already given to it); None: 0.

    Returns:
        Each task's owner, in the order of ``costs``.

    Raises:
        ValueError: when ``world_size`` is below 1, a cost is negative, ``keys`` does not
            give one entry per task whose costs ``shared`` holds, or ``loads`` not one value
            per rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    shared = {} if shared is None else dict(shared)
    if any(cost < 0 for cost in [*costs, *shared.values()]):
        raise ValueError(f"costs: expected values >= 0, got {list(costs)} and {shared}")
    keys = [None] * len(costs) if keys is None else list(keys)
    if len(keys) != len(costs) or any(key is not None and key not in shared for key in keys):
        raise ValueError(
            f"keys: expected one key or None per task, each key's cost in shared, got {keys} "
            f"for {len(costs)} tasks and shared {shared}"
        )
    if loads is not None and len(loads) != world_size:
        raise ValueError(f"loads: expected {world_size} values, one per rank, got {list(loads)}")
    loads = [0.0] * world_size if loads is None else [float(load) for load in loads]
    held: list[dict[Hashable, int]] = [{} for _ in range(world_size)]  # tasks per key

    def added(task: int, rank: int) -> float:
        key = keys[task]
        return costs[task] + (shared[key] if key is not None and key not in held[rank] else 0.0)

    def place(task: int, rank: int, sign: int) -> None:
        key = keys[task]
        if sign < 0 and key is not None and held[rank][key] == 1:
            del held[rank][key]
        loads[rank] += sign * added(task, rank)
        if sign > 0 and key is not None:
            held[rank][key] = held[rank].get(key, 0) + 1
        elif sign < 0 and key in held[rank]:
            held[rank][key] -= 1

    owners = [0] * len(costs)
    standalone = [added(task, 0) for task in range(len(costs))]
    for task in sorted(range(len(costs)), key=lambda task: (-standalone[task], task)):
        owners[task] = min(
            range(world_size), key=lambda rank: (loads[rank] + added(task, rank), rank)
        )
        place(task, owners[task], 1)
    while True:
        busiest = max(range(world_size), key=lambda rank: (loads[rank], -rank))
        best = (loads[busiest] * (1 - 1e-9), -1, -1)  # a move must lower it, beyond rounding
        for task in (task for task, owner in enumerate(owners) if owner == busiest):
            place(task, busiest, -1)
            for rank in range(world_size):
                if rank != busiest:
                    moved = loads[rank] + added(task, rank)
                    rest = max(load for other, load in enumerate(loads) if other != rank)
                    best = min(best, (max(moved, rest), task, rank))
            place(task, busiest, 1)
        if best[1] < 0:
            return owners
        _, task, rank = best
        place(task, busiest, -1)
        place(task, rank, 1)
        owners[task] = rank


def all_gather_or_raise(value: Any, error: Exception | None) -> list[Any]:
    """Every rank's ``value``, or on every rank the error one rank hit (a collective call).

    Call it after a step that may fail on some ranks only (a layer solved on its owner): all
    ranks reach it, so a failure on one rank fails all of them with the same error instead
    of leaving the others waiting in their next collective.

    Args:
        value: this rank's result (picklable; ignored when ``error`` is given).
        error: what this rank's step raised, or None.

    Returns:
        The ranks' values, by rank (``[value]`` outside ``torch.distributed``).

    Raises:
        Exception: ``error`` on the rank that hit it; on the others the error of the lowest
            rank that failed (the same type where it can be pickled, else a
            ``RuntimeError`` with its type and message), noting that rank; so does a rank
            whose ``error`` is an :class:`AnotherRankFailedError`.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [value]
    rank, world_size = rank_and_world_size()
    payload = ("error", _portable(error)) if error is not None else ("ok", value)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, payload)
    if error is not None and not isinstance(error, AnotherRankFailedError):
        raise error
    for source, (kind, content) in enumerate(gathered):
        if kind == "error" and not isinstance(content, AnotherRankFailedError):
            content.add_note(f"(raised on rank {source} of {world_size})")
            raise content
    if error is not None:
        raise error
    return [content for _, content in gathered]


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a ``RuntimeError`` naming its type and message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # an error whose arguments or attributes cannot be pickled
        return RuntimeError(f"{type(error).__name__}: {error}")


def check_same_on_all_ranks(value: int, what: str) -> None:
    """Fail on every rank when ranks disagree on ``value``, instead of hanging later.

    Args:
        value: an integer every rank must agree on (e.g. the number of blocks).
        what: what ``value`` counts, for the error message.

    Raises:
        RuntimeError: if some rank has another value.
    """
    if not is_distributed():
        return
    low = all_reduce_min_(torch.tensor([value], dtype=torch.long))
    high = all_reduce_max_(torch.tensor([value], dtype=torch.long))
    if low.item() != high.item():
        raise RuntimeError(
            f"ranks disagree on {what}: between {low.item()} and {high.item()}; every rank "
            f"must hold the same model so that they calibrate the same blocks in lockstep"
        )


class ShardSampler(Sampler[int]):
    """Gives rank ``r`` the samples ``r, r + world_size, ...`` without repeating any.

    Lightning's default ``DistributedSampler`` repeats samples so that every rank gets as many;
    calibration statistics would then count those samples twice. Use this sampler with
    ``Trainer(use_distributed_sampler=False)`` to make a multi-process run see exactly the
    data a single process sees. The rank is read when iterating, so the sampler can be built
    before the processes start.

    Args:
        num_samples: the length of the data set.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[int]:
        rank, world_size = rank_and_world_size()
        return iter(range(rank, self.num_samples, world_size))

    def __len__(self) -> int:
        rank, world_size = rank_and_world_size()
        return len(range(rank, self.num_samples, world_size))


def _all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not is_distributed():
        return tensor
    with _on_backend_device(tensor) as buffer:
        dist.all_reduce(buffer, op=op)
    return tensor


@contextmanager
def _on_backend_device(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``tensor``, or a copy on the device the backend reduces on, written back after.

    Gloo reduces CPU tensors and NCCL CUDA tensors.
    """
    device = _backend_device()
    buffer = tensor if tensor.device == device else tensor.to(device)
    yield buffer
    if buffer is not tensor:
        tensor.copy_(buffer)


def _backend_device() -> torch.device:
    """Where the backend's collectives take their tensors: CUDA for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

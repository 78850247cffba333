"""Memory up front: what the student, its gradients, the optimizer state and the teacher need."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

__all__ = [
    "OPTIMIZER_STATES",
    "MemoryPlan",
    "available_memory",
    "check_memory",
    "plan_memory",
    "report_memory_plan",
]

OPTIMIZER_STATES = 2
"""fp32 states per trainable element the plan counts (AdamW's two moments)."""

Bytes = dict[torch.dtype, int]


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by dtype that a training run holds, per rank.

    Attributes:
        student: the student's parameters and buffers (its share, when sharded).
        gradients: a gradient per trainable parameter, in the parameter's dtype.
        optimizer: :data:`OPTIMIZER_STATES` fp32 states per trainable element.
        teacher: the teacher's parameters and buffers (none without a teacher).
    """

    student: Bytes
    gradients: Bytes
    optimizer: Bytes
    teacher: Bytes = field(default_factory=dict)

    def total(self, teacher: bool = True) -> int:
        """All bytes, the teacher's included unless ``teacher`` is False."""
        parts = [self.student, self.gradients, self.optimizer] + ([self.teacher] if teacher else [])
        return sum(sum(part.values()) for part in parts)

    def describe(self) -> str:
        """One line: each part's bytes by dtype, and the total."""
        parts = {
            "student": self.student,
            "gradients": self.gradients,
            "optimizer state": self.optimizer,
            "teacher": self.teacher,
        }
        text = "; ".join(f"{name} {_by_dtype(part)}" for name, part in parts.items() if part)
        return f"{text}; total {_size(self.total())}"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> Bytes:
    """Bytes of ``tensors`` by dtype.

    Args:
        tensors: the tensors (each counted once, as given).

    Returns:
        dtype → bytes.
    """
    total: Bytes = {}
    for tensor in tensors:
        total[tensor.dtype] = total.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    return total


def plan_memory(
    student: nn.Module, teacher: nn.Module | None = None, shards: int = 1
) -> MemoryPlan:
    """What training ``student`` (against ``teacher``) holds on each rank.

    Tied parameters count once. The student, its gradients and the optimizer state are
    divided among ``shards`` ranks (FSDP); the teacher is whole on each rank.

    Args:
        student: the trained model.
        teacher: the distillation teacher, or None.
        shards: ranks the student is sharded across (1: not sharded).

    Returns:
        The plan.

    Raises:
        ValueError: when ``shards`` is below 1.
    """
    if shards < 1:
        raise ValueError(f"shards: expected an integer >= 1, got {shards}")
    trainable = [p for p in student.parameters() if p.requires_grad]
    states = sum(p.numel() for p in trainable) * OPTIMIZER_STATES * 4

    def share(part: Bytes) -> Bytes:
        return {dtype: -(-size // shards) for dtype, size in part.items()}

    return MemoryPlan(
        student=share(tensor_bytes([*student.parameters(), *student.buffers()])),
        gradients=share(tensor_bytes(trainable)),
        optimizer=share({torch.float32: states} if states else {}),
        teacher=tensor_bytes([*teacher.parameters(), *teacher.buffers()]) if teacher else {},
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now: GPU memory for CUDA, available RAM for the CPU.

    Args:
        device: the device.

    Returns:
        Bytes, or None where it cannot be known (other devices, no ``/proc/meminfo``).
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    plan: MemoryPlan,
    device: torch.device,
    teacher_device: torch.device | None = None,
    ranks_per_device: int = 1,
) -> None:
    """Logs ``plan`` and warns where it needs more memory than a device has free.

    Args:
        plan: the per-rank plan.
        device: the student's device.
        teacher_device: the teacher's device (None: the student's).
        ranks_per_device: processes whose plans share ``device``'s memory (several CPU ranks
            on one machine).
    """
    rank_zero_info(f"Compressor: memory per rank: {plan.describe()}")
    teacher_device = device if teacher_device is None else torch.device(teacher_device)
    needs = {device: plan.total(teacher=False) * ranks_per_device}
    if plan.teacher:
        teacher_ranks = ranks_per_device if teacher_device == device else 1
        teacher_bytes = sum(plan.teacher.values()) * teacher_ranks
        needs[teacher_device] = needs.get(teacher_device, 0) + teacher_bytes
    for where, need in needs.items():
        free = available_memory(where)
        if free is not None and need > free:
            warnings.warn(
                f"Compressor: training needs about {_size(need)} on {where} "
                f"({plan.describe()}; x{ranks_per_device} rank(s)) but {_size(free)} is free; "
                "expect running out of memory (activations come on top)",
                stacklevel=2,
            )


def report_memory_plan(
    trainer: object,
    student: nn.Module,
    teacher: nn.Module | None = None,
    teacher_device: str | torch.device | None = None,
) -> MemoryPlan:
    """Plans and checks the memory of a Trainer's run (called at ``Compressor.setup``).

    Under FSDP (``ModelParallelStrategy``, ``FSDPStrategy``) the student is counted as shared
    by the ranks; on the CPU the ranks of one machine share its memory.

    Args:
        trainer: the Lightning Trainer.
        student: the LightningModule.
        teacher: the teacher, or None.
        teacher_device: the teacher's device (None: the student's).

    Returns:
        The plan.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
    device = strategy.root_device
    plan = plan_memory(student, teacher, trainer.world_size if sharded else 1)
    per_device = trainer.num_devices if device.type == "cpu" else 1
    check_memory(plan, device, teacher_device, per_device)
    return plan


def _by_dtype(part: Bytes) -> str:
    """``1.5 MiB (float32), 12.0 KiB (bfloat16)``."""
    return ", ".join(
        f"{_size(size)} ({str(dtype).removeprefix('torch.')})" for dtype, size in part.items()
    )


def _size(size: int) -> str:
    """Bytes in binary units."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"

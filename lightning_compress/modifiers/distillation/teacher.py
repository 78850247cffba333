"""The distillation teacher: a frozen copy of the student made before compression changes it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from loguru import logger
from torch import nn

__all__ = [
    "UNCOMPRESSED",
    "check_teacher",
    "check_teacher_vocabulary",
    "copy_as_teacher",
    "freeze_teacher",
    "is_student_copy",
    "make_teacher",
    "place_teacher",
    "resolve_dtype",
]

# ``Compressor(teacher=UNCOMPRESSED)``: distil from the model as it was before compression.
UNCOMPRESSED = "uncompressed"

# Module hook dictionaries a copy leaves empty: hooks of the student (a callback's, a
# modifier's, a checkpoint's) belong to the student, and copying them would copy their owners.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# Attributes of a LightningModule that point at the run, not at the model.
_RUN_ATTRIBUTES = ("_trainer", "_fabric")
_STUDENT_COPY = "_lightning_compress_student_copy"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point dtype from a ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``).

    Args:
        dtype: the dtype, its name, or None.

    Returns:
        The dtype, or None.

    Raises:
        ValueError: naming ``teacher_dtype`` when it is not a floating-point dtype.
    """
    if dtype is None:
        return None
    resolved = dtype
    if not isinstance(dtype, torch.dtype):
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
        resolved = getattr(torch, str(name), None)
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise ValueError(
            f"teacher_dtype: expected a floating-point torch dtype or its name (e.g. "
            f"'bfloat16', 'float16', 'float32'), got {dtype!r}"
        )
    return resolved


def check_teacher(teacher: nn.Module | str | None, dtype: torch.dtype | str | None = None) -> None:
    """Refuse a ``teacher`` that is neither a module, ``"uncompressed"`` nor None, or a bad dtype.

    Args:
        teacher: the setting.
        dtype: the ``teacher_dtype`` setting.

    Raises:
        ValueError: naming ``teacher`` or ``teacher_dtype`` and what was expected.
    """
    resolve_dtype(dtype)
    if teacher is None or isinstance(teacher, nn.Module) or teacher == UNCOMPRESSED:
        return
    raise ValueError(
        f"teacher: expected a model (nn.Module), {UNCOMPRESSED!r} (a frozen copy of the model "
        f"before compression) or None, got {teacher!r}"
    )


def check_teacher_vocabulary(teacher: nn.Module | None, student: nn.Module) -> None:
    """Refuse, before anything changes the student, a teacher whose logits have another width.

    The width is the number of outputs of each model's output layer (a Hugging Face
    model's ``get_output_embeddings()``, or an ``lm_head`` ``Linear``), looked for in the
    model and in its ``model`` attribute (a LightningModule holding it). Models without one
    are checked at the first batch, on their outputs.

    Args:
        teacher: the teacher (None: no distillation).
        student: the student (e.g. the LightningModule).

    Raises:
        ValueError: naming both logit shapes when the widths differ.
    """
    if teacher is None:
        return
    widths = _output_width(teacher), _output_width(student)
    if None in widths or widths[0] == widths[1]:
        return
    raise ValueError(
        f"teacher: its logits have shape [..., {widths[0]}] and the student's [..., "
        f"{widths[1]}]; expected a teacher with the student's vocabulary (output layers of "
        f"{type(teacher).__name__} and {type(student).__name__} differ)"
    )


def _output_width(model: nn.Module) -> int | None:
    """The number of logits of ``model``'s (or its ``model`` attribute's) output layer."""
    for candidate in (model, getattr(model, "model", None)):
        if not isinstance(candidate, nn.Module):
            continue
        get_output = getattr(candidate, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else getattr(candidate, "lm_head", None)
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return weight.shape[0]
    return None


def make_teacher(
    teacher: nn.Module | str | None,
    student: nn.Module,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module | None:
    """The teacher a ``Compressor(teacher=...)`` setting asks for, frozen.

    Args:
        teacher: a model (converted to ``dtype``/``device`` in place), ``"uncompressed"``
            (``copy_as_teacher(student)``), or None.
        student: the model being compressed, not yet changed by any modifier.
        dtype: the teacher's floating-point dtype (or its name); None keeps it.
        device: the teacher's device; None keeps it.

    Returns:
        The teacher, or None.

    Raises:
        ValueError: for a bad ``teacher`` or ``dtype``.
    """
    check_teacher(teacher, dtype)
    dtype = resolve_dtype(dtype)
    if teacher is None:
        return None
    if isinstance(teacher, str):
        return copy_as_teacher(student, dtype, device)
    return freeze_teacher(teacher.to(device=device, dtype=dtype))


def place_teacher(teacher: nn.Module, device: torch.device | str) -> None:
    """Move ``teacher`` to ``device`` and keep it frozen (at the start of training).

    Args:
        teacher: the teacher.
        device: where it runs (its own device, or the student's).
    """
    freeze_teacher(teacher.to(device))


def copy_as_teacher(
    student: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A frozen copy of ``student`` to distil from.

    Each parameter and buffer is converted straight to ``dtype`` (floating-point ones) and
    ``device`` while it is copied, so a bfloat16 teacher of an fp32 student never exists as a
    second fp32 copy. Tied weights stay tied. The copy has no hooks (those of the student
    belong to the student's run), no reference to a Trainer, ``requires_grad`` False
    everywhere and is in eval mode. It is not a submodule of ``student``, so it is in neither
    its parameters nor its ``state_dict`` (nor in checkpoints).

    Args:
        student: the model to copy (e.g. a LightningModule, before any modifier changes it).
        dtype: the teacher's floating-point dtype; None keeps each tensor's dtype.
        device: the teacher's device; None keeps each tensor's device.

    Returns:
        The teacher.

    Raises:
        ValueError: when ``student`` has weights on the meta device (not loaded yet).
    """
    named = [*student.named_parameters(), *student.named_buffers()]
    meta = [name for name, tensor in named if tensor.is_meta]
    if meta:
        raise ValueError(
            f"teacher='{UNCOMPRESSED}' copies the model's weights at setup, but "
            f"{type(student).__name__} has weights on the meta device there ({meta[:4]}); "
            f"expected a model with its weights loaded before Trainer.fit, or pass a teacher model"
        )
    memo: dict[int, Any] = {}
    for tensor in [*student.parameters(), *student.buffers()]:
        if id(tensor) not in memo:
            memo[id(tensor)] = _frozen_copy(tensor, dtype, device)
    for module in student.modules():
        for name in _HOOK_DICTS:
            hooks = module.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
        for name in _RUN_ATTRIBUTES:
            run = module.__dict__.get(name)
            if run is not None:
                memo[id(run)] = None
    teacher = copy.deepcopy(student, memo)
    setattr(teacher, _STUDENT_COPY, True)
    freeze_teacher(teacher)
    size = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    logger.info(
        "Distillation teacher: a frozen copy of the uncompressed {} ({:.1f} MiB{})",
        type(student).__name__,
        size / 2**20,
        f" in {dtype}" if dtype is not None else "",
    )
    return teacher


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode with ``requires_grad`` False on all its parameters.

    Args:
        teacher: the teacher.

    Returns:
        ``teacher`` itself.
    """
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def is_student_copy(teacher: nn.Module) -> bool:
    """Whether ``teacher`` was made by ``copy_as_teacher`` (so it has the student's structure).

    Args:
        teacher: the teacher.

    Returns:
        True for a copy of the student.
    """
    return getattr(teacher, _STUDENT_COPY, False)


def _frozen_copy(
    tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None
) -> torch.Tensor:
    """A detached copy of ``tensor`` (never sharing its memory) in ``dtype`` on ``device``."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    value = tensor.detach().to(device=device or tensor.device, dtype=target, copy=True)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(value, requires_grad=False)
    return value

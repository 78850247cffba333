"""``OutputDistillationModifier``: distil a teacher's outputs into the student during training."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import Modifier
from lightning_compress.recipe.errors import RecipeError

__all__ = ["OutputDistillationModifier", "distillation_term"]


def distillation_term(
    student: torch.Tensor, teacher: torch.Tensor, comparison: str, temperature: float
) -> torch.Tensor:
    """The distillation loss between two logit tensors of the same shape.

    Args:
        student: the student's logits (``[..., classes]``).
        teacher: the teacher's logits.
        comparison: ``"kl"``: KL(teacher ‖ student) of the temperature-softened
            distributions, times ``temperature²`` (Hinton et al.), averaged over positions;
            ``"mse"``: mean squared error of the logits.
        temperature: the softmax temperature for ``"kl"``.

    Returns:
        A scalar loss.
    """
    if comparison == "mse":
        return nn.functional.mse_loss(student.float(), teacher.float())
    log_student = nn.functional.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = nn.functional.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return per_position.mean() * temperature**2


class OutputDistillationModifier(Modifier):
    """Add a distillation term to the loss: ``(1 - hardness)·loss + hardness·distill``.

    The student is the module named by ``targets`` (default: the model the session holds,
    e.g. the LightningModule); its inputs are recorded by a forward-pre-hook and fed to the
    teacher (``Compressor(teacher=...)``) under ``torch.no_grad``. A callback cannot change the
    loss a ``training_step`` returns, so the user opts in with one line in ``training_step``::

        loss = compression_loss(self, loss)

    Forgetting that line while the modifier is active is an error at the end of the batch.

    Args:
        targets: the module whose output is distilled ("" for the whole model).
        comparison: ``"kl"`` or ``"mse"``.
        temperature: softmax temperature for ``"kl"``.
        hardness: weight of the distillation term, in [0, 1].
        start: when distillation starts (training schedule).
        end: when it ends.
    """

    targets: str | list[str] = ""
    comparison: Literal["kl", "mse"] = "kl"
    temperature: float = 1.0
    hardness: float = 0.5
    start: float | None = 0.0

    def validate(self) -> None:
        if not isinstance(self.targets, str):
            self.fail("targets", "one module name ('' for the whole model)")
        if self.temperature <= 0:
            self.fail("temperature", "a positive float")
        if not 0.0 <= self.hardness <= 1.0:
            self.fail("hardness", "a float in [0, 1]")
        if self.is_one_shot:
            self.fail("start", "a training index >= 0 (distillation needs training)")

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        if state.teacher_model is None:
            raise RecipeError(
                "OutputDistillationModifier needs a teacher: pass Compressor(teacher=...) "
                "or initialize(teacher_model=...)"
            )
        try:
            self._student = state.model.get_submodule(self.targets)
        except AttributeError as err:
            raise RecipeError(f"OutputDistillationModifier.targets: {err}") from err
        self._inputs: tuple[tuple, dict] | None = None
        self._output: torch.Tensor | None = None
        self._loss_modified = False

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.register_hook(self._student, self._record_inputs, "forward_pre", with_kwargs=True)
        self.register_hook(self._student, self._record_output, "forward")

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.remove_hooks()

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            self._inputs = (args, kwargs)

    def _record_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training:
            self._output = _logits(output)

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.BATCH_START:
            self._inputs, self._output, self._loss_modified = None, None, False
        elif (
            event.type_ == EventType.BATCH_END
            and self._output is not None
            and not self._loss_modified
        ):
            raise RuntimeError(
                "OutputDistillationModifier is active but the loss was not modified: add "
                "`loss = compression_loss(self, loss)` to your training_step"
            )

    def modify_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        if self._output is None or self._inputs is None:
            raise RuntimeError(
                f"OutputDistillationModifier saw no training forward of "
                f"'{self.targets or 'the model'}' before compression_loss(); run the student "
                f"before computing the loss"
            )
        args, kwargs = self._inputs
        with torch.no_grad():
            teacher = _logits(state.teacher_model(*args, **kwargs))
        if teacher.shape != self._output.shape:
            raise ValueError(
                f"teacher output shape {tuple(teacher.shape)} differs from the student's "
                f"{tuple(self._output.shape)}; expected a teacher with the same output shape"
            )
        term = distillation_term(self._output, teacher, self.comparison, self.temperature)
        self._loss_modified = True
        return (1 - self.hardness) * loss + self.hardness * term


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__} output")

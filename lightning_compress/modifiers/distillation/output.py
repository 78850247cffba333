"""``OutputDistillationModifier``: distil a teacher's outputs into the student during training."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.model_layer import match_named_modules
from lightning_compress.core.state import State
from lightning_compress.core.tensors import map_tensors
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.distillation.teacher import is_student_copy
from lightning_compress.recipe.errors import RecipeError

__all__ = ["OutputDistillationModifier", "distillation_term"]


def distillation_term(
    student: torch.Tensor,
    teacher: torch.Tensor,
    comparison: str,
    temperature: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The distillation loss between two logit tensors of the same shape, computed in fp32.

    Args:
        student: the student's logits (``[..., classes]``).
        teacher: the teacher's logits.
        comparison: ``"kl"``: KL(teacher ‖ student) of the temperature-softened
            distributions, times ``temperature²`` (Hinton et al.), averaged over positions;
            ``"mse"``: mean squared error of the logits.
        temperature: the softmax temperature for ``"kl"``.
        chunk_size: for ``"kl"``, compute at most this many positions at a time and recompute
            them in the backward pass, so fp32 copies of the logits exist for one chunk only
            (a long sequence times a large vocabulary); None: all positions at once.

    Returns:
        A scalar loss.
    """
    if comparison == "mse":
        return nn.functional.mse_loss(student.float(), teacher.float())
    rows, targets = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    size = rows.shape[0] if chunk_size is None else chunk_size
    recompute = size < rows.shape[0] and torch.is_grad_enabled() and rows.requires_grad
    total = rows.new_zeros((), dtype=torch.float32)
    for begin in range(0, rows.shape[0], size):
        chunk = (rows[begin : begin + size], targets[begin : begin + size], temperature)
        if recompute:
            total = total + checkpoint(_kl_sum, *chunk, use_reentrant=False)
        else:
            total = total + _kl_sum(*chunk)
    return total / rows.shape[0] * temperature**2


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher/T) ‖ softmax(student/T)), in fp32."""
    log_student = nn.functional.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = nn.functional.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum()


class OutputDistillationModifier(Modifier):
    """Add a distillation term to the loss: ``(1 - hardness)·loss + hardness·distill``.

    ``distill`` is the comparison of the student's and the teacher's outputs (KL of the
    temperature-softened logits, or their MSE), plus ``layer_weight`` times the mean, over
    the ``layer_targets`` layers, of the MSE between the student's and the teacher's outputs
    of that layer (e.g. each decoder block's hidden states).

    The student is the module named by ``targets`` (default: the model the session holds,
    e.g. the LightningModule); its inputs are recorded by a forward-pre-hook and fed to the
    teacher once per batch, under ``torch.no_grad``, in the teacher's dtype and on its device
    (floating-point inputs are cast to it); hooks collect the layer outputs of both in those
    same forward passes (the student runs once, as the ``training_step`` runs it). Outputs
    are compared in fp32. The teacher is ``Compressor(teacher=...)``: another model with the
    same output shape, or ``"uncompressed"`` for a frozen copy of the student made before
    compression (then ``targets`` and ``layer_targets`` name the same modules in both).

    A callback cannot change the loss a ``training_step`` returns, so the user opts in with one
    line in ``training_step`` (``CausalLMModule`` has it)::

        loss = compression_loss(self, loss)

    Forgetting that line while the modifier is active is an error at the end of the batch.

    Args:
        targets: the module whose output is distilled ("" for the whole model).
        comparison: ``"kl"`` or ``"mse"``.
        temperature: softmax temperature for ``"kl"``.
        hardness: weight of the distillation term, in [0, 1].
        layer_targets: layers (class names, module names or ``re:`` regexes, inside the
            ``targets`` module) whose outputs are compared by MSE; none by default.
        layer_weight: the weight of the layers' MSE in the distillation term (>= 0).
        kl_chunk_size: positions whose KL is computed at once (the rest is recomputed in
            chunks in the backward pass, bounding fp32 memory for long sequences).
        start: when distillation starts (training schedule).
        end: when it ends.

    Raises:
        RecipeError: at initialize, without a teacher, for a ``targets`` module that does not
            exist, or ``layer_targets`` that match no layer of the student or of the teacher.
        ValueError: at the first batch, for a teacher whose output or layer outputs have
            another shape than the student's (both shapes named).
    """

    targets: str | list[str] = ""
    comparison: Literal["kl", "mse"] = "kl"
    temperature: float = 1.0
    hardness: float = 0.5
    layer_targets: list[str] = dataclasses.field(default_factory=list)
    layer_weight: float = 1.0
    kl_chunk_size: int = 1024
    start: float | None = 0.0

    def validate(self) -> None:
        if not isinstance(self.targets, str):
            self.fail("targets", "one module name ('' for the whole model)")
        if self.temperature <= 0:
            self.fail("temperature", "a positive float")
        if not 0.0 <= self.hardness <= 1.0:
            self.fail("hardness", "a float in [0, 1]")
        if self.layer_weight < 0:
            self.fail("layer_weight", "a float >= 0")
        if self.kl_chunk_size < 1:
            self.fail("kl_chunk_size", "an integer >= 1")
        if self.is_one_shot:
            self.fail("start", "a training index >= 0 (distillation needs training)")

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        if state.teacher_model is None:
            raise RecipeError(
                "OutputDistillationModifier needs a teacher: pass Compressor(teacher=...) "
                "(e.g. teacher='uncompressed') or initialize(teacher_model=...)"
            )
        self._student = _submodule(state.model, self.targets, "the student")
        teacher = state.teacher_model
        if is_student_copy(teacher):
            teacher = _submodule(teacher, self.targets, "the teacher")
        self._teacher = teacher
        self._student_layers, self._teacher_layers = self._matched_layers()
        self._inputs: tuple[tuple, dict] | None = None
        self._output: torch.Tensor | None = None
        self._layer_outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._loss_modified = False

    def _matched_layers(self) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """The ``layer_targets`` layers of the student and the same-named ones of the teacher."""
        if not self.layer_targets:
            return {}, {}
        try:
            student = match_named_modules(self._student, self.layer_targets)
        except ValueError as err:
            raise RecipeError(f"OutputDistillationModifier.layer_targets: {err}") from err
        teacher_modules = dict(self._teacher.named_modules())
        missing = [name for name in student if name not in teacher_modules]
        if missing:
            raise RecipeError(
                f"OutputDistillationModifier.layer_targets: the teacher "
                f"({type(self._teacher).__name__}) has no layers {missing[:6]}; expected a "
                f"teacher with the student's layer names (e.g. teacher='uncompressed')"
            )
        return student, {name: teacher_modules[name] for name in student}

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.register_hook(self._student, self._record_inputs, "forward_pre", with_kwargs=True)
        self.register_hook(self._student, self._record_output, "forward")
        for side, layers in (("student", self._student_layers), ("teacher", self._teacher_layers)):
            for name, layer in layers.items():
                self.register_hook(layer, self._layer_recorder(side, name), "forward")

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self.remove_hooks()

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            self._inputs = (args, kwargs)

    def _record_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training:
            self._output = _output_tensor(output)

    def _layer_recorder(self, side: str, name: str) -> Any:
        """A forward hook keeping ``name``'s output of the student (training) or teacher."""
        outputs = self._layer_outputs[side]

        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if side == "teacher" or module.training:
                outputs[name] = _output_tensor(output)

        return record

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.BATCH_START:
            self._inputs, self._output, self._loss_modified = None, None, False
            for outputs in self._layer_outputs.values():
                outputs.clear()
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
        teacher = self._teacher_forward().to(self._output.device)
        _check_shapes("teacher output", teacher, self._output)
        term = distillation_term(
            self._output, teacher, self.comparison, self.temperature, self.kl_chunk_size
        )
        if self._student_layers:
            term = term + self.layer_weight * self._layer_term()
        self._loss_modified = True
        return (1 - self.hardness) * loss + self.hardness * term

    def _teacher_forward(self) -> torch.Tensor:
        """The teacher's logits for the student's recorded inputs (once per batch)."""
        reference = next(self._teacher.parameters(), None)

        def to_teacher(tensor: torch.Tensor) -> torch.Tensor:
            if reference is None:
                return tensor
            dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
            return tensor.to(device=reference.device, dtype=dtype)

        args, kwargs = map_tensors(self._inputs, to_teacher)
        self._layer_outputs["teacher"].clear()
        with torch.no_grad():
            return _output_tensor(self._teacher(*args, **kwargs))

    def _layer_term(self) -> torch.Tensor:
        """The mean over ``layer_targets`` of the MSE of the student's and teacher's outputs."""
        student, teacher = self._layer_outputs["student"], self._layer_outputs["teacher"]
        terms = []
        for name in self._student_layers:
            if name not in student or name not in teacher:
                side = "student" if name not in student else "teacher"
                raise RuntimeError(
                    f"OutputDistillationModifier.layer_targets: layer '{name}' of the {side} "
                    f"did not run in this batch's forward pass"
                )
            ours, theirs = student[name], teacher[name].to(student[name].device)
            _check_shapes(f"teacher output of layer '{name}'", theirs, ours)
            terms.append(nn.functional.mse_loss(ours.float(), theirs.float()))
        return torch.stack(terms).mean()


def _submodule(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise RecipeError(f"OutputDistillationModifier.targets: {which}: {err}") from err


def _check_shapes(what: str, teacher: torch.Tensor, student: torch.Tensor) -> None:
    if teacher.shape != student.shape:
        raise ValueError(
            f"{what} shape {tuple(teacher.shape)} differs from the student's "
            f"{tuple(student.shape)}; expected a teacher with the same output shape (the same "
            f"vocabulary and hidden sizes)"
        )


def _output_tensor(output: Any) -> torch.Tensor:
    """The logits of a model's output, or the hidden states of a layer's (first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__} output")

"""``QuantizationModifier``: round-to-nearest weight quantization of targeted Linear layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_compress.core.events import Event
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import ONE_SHOT, Modifier
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.ops import fake_quantize, qparams_for_weight
from lightning_compress.recipe.errors import RecipeError

__all__ = ["QuantizationModifier"]

WEIGHT_ONLY_PRESETS = [name for name, roles in PRESET_SCHEMES.items() if list(roles) == ["weights"]]


class QuantizationModifier(Modifier):
    """Round-to-nearest (RTN) weight quantization, one-shot and data-free.

    Each targeted ``nn.Linear`` gets its weight replaced by its quantize→dequantize
    round trip, and keeps ``weight_scale`` / ``weight_zero_point`` buffers (compressed-tensors
    names) plus a ``quantization_scheme`` attribute describing how it was quantized.
    All layers are computed before any is changed, so an error leaves the model as it was.

    Args:
        scheme: a preset name (``W4A16``, ``W4A16_ASYM``, ``W8A16``) applied to ``targets``, or
            ``{preset: [targets]}``.
        config_groups: ``{group_name: {targets, weights: {num_bits, type, symmetric, strategy,
            group_size, observer}}}`` in compressed-tensors form.
        targets: layers the ``scheme`` preset applies to.
        ignore: layers never quantized (e.g. ``lm_head``).
        start: must be -1 (one-shot).
    """

    scheme: str | dict[str, list[str]] | None = None
    config_groups: dict[str, dict[str, Any]] | None = None
    start: float | None = ONE_SHOT

    def validate(self) -> None:
        if self.scheme is None and self.config_groups is None:
            self.fail(
                "scheme", f"a preset name ({', '.join(WEIGHT_ONLY_PRESETS)}) or config_groups"
            )
        if not self.is_one_shot:
            self.fail("start", "-1 (one-shot weight quantization)")
        for scheme in self.resolved_schemes():
            for role in ("input_activations", "output_activations"):
                if getattr(scheme, role) is not None:
                    raise RecipeError(
                        f"{type(self).__name__}: scheme for {scheme.targets} quantizes {role}, "
                        f"which this modifier does not support; expected weight-only schemes "
                        f"({', '.join(WEIGHT_ONLY_PRESETS)}) or config_groups with 'weights' only"
                    )
            if scheme.weights is None:
                raise RecipeError(
                    f"{type(self).__name__}: scheme for {scheme.targets} has no 'weights'; "
                    f"expected weight quantization arguments"
                )

    def resolved_schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies, presets and config groups together.

        Returns:
            The schemes, in recipe order.

        Raises:
            RecipeError: for an unknown preset or an invalid config group; the message names
                the field.
        """
        schemes = []
        try:
            if isinstance(self.scheme, str):
                schemes.append(preset_scheme(self.scheme, _as_list(self.targets)))
            elif isinstance(self.scheme, dict):
                schemes += [preset_scheme(name, targets) for name, targets in self.scheme.items()]
            for name, group in (self.config_groups or {}).items():
                schemes.append(QuantizationScheme.from_dict(group, where=f"config_groups.{name}"))
        except ValueError as err:
            raise RecipeError(f"{type(self).__name__}: {err}") from err
        return schemes

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self._plan = self._plan_layers(state.model)

    def _plan_layers(self, model: nn.Module) -> dict[str, tuple[nn.Linear, QuantizationScheme]]:
        plan: dict[str, tuple[nn.Linear, QuantizationScheme]] = {}
        for scheme in self.resolved_schemes():
            for name, module in self.resolve_targets(model, scheme.targets).items():
                if name in plan:
                    raise RecipeError(
                        f"{type(self).__name__}: layer '{name}' is targeted by two schemes "
                        f"({plan[name][1].targets} and {scheme.targets}); expected one"
                    )
                if not isinstance(module, nn.Linear):
                    raise RecipeError(
                        f"{type(self).__name__}.targets: layer '{name}' is a "
                        f"{type(module).__name__}; expected Linear layers"
                    )
                plan[name] = (module, scheme)
        _check_group_sizes(plan)
        return plan

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        quantized = {
            name: _quantize_weight(module.weight, scheme.weights)
            for name, (module, scheme) in self._plan.items()
        }
        errors = {}
        for name, (module, scheme) in self._plan.items():
            weight, scale, zero_point = quantized[name]
            errors[name] = _relative_error(module.weight, weight)
            with torch.no_grad():
                module.weight.copy_(weight)
            self.add_buffer(module, "weight_scale", scale)
            self.add_buffer(module, "weight_zero_point", zero_point)
            module.quantization_scheme = scheme
        if state.loggers is not None and errors:
            state.loggers.log_scalars("QuantizationError", errors)
        self.layer_errors = errors


def _quantize_weight(
    weight: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        scale, zero_point = qparams_for_weight(weight.detach(), args)
        return fake_quantize(weight.detach(), scale, zero_point, args), scale, zero_point


def _check_group_sizes(plan: dict[str, tuple[nn.Linear, QuantizationScheme]]) -> None:
    bad = [
        f"{name} (in_features={module.in_features})"
        for name, (module, scheme) in plan.items()
        if scheme.weights.strategy == "group" and module.in_features % scheme.weights.group_size
    ]
    if bad:
        sizes = sorted({scheme.weights.group_size for _, scheme in plan.values() if scheme.weights})
        raise RecipeError(
            f"QuantizationModifier: group_size {sizes} does not divide the input features of "
            f"{bad}; expected a group_size that divides them, or add these layers to ignore"
        )


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    with torch.no_grad():
        return float((weight - quantized).norm() / weight.norm().clamp_min(1e-12))


def _as_list(targets: str | list[str]) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)

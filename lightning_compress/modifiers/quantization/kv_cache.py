"""KV-cache and attention quantization: fp8 keys, values (and queries) with calibrated scales.

Semantics are compressed-tensors': a ``kv_cache_scheme`` quantizes the keys and values of
every attention module (after the rotary embedding, as the cache stores them) with the
scales ``k_scale`` / ``v_scale``; a config group whose targets are attention modules and
which quantizes only ``input_activations`` quantizes their queries too (``q_scale``), with
the group's arguments for queries, keys and values alike (such a group replaces the
``kv_cache_scheme`` on its modules). Strategy ``tensor`` gives one scale per tensor (``[1]``),
``attn_head`` one per head (``[heads, 1, 1]``: key/value heads for ``k_scale`` and
``v_scale``, query heads for ``q_scale``). Scales are symmetric fp8 e4m3:
``max|x| / 448`` over the calibration tokens, in the attention module's dtype.

The calibrated module holds the scales as buffers and an ``attention_scheme``
(:class:`AttentionScheme`) attribute; export writes both (``<attn>.k_scale``, the
``kv_cache_scheme`` of ``quantization_config``), which is where vLLM reads them.
:func:`quantized_attention` runs a model with its keys, values and queries fake-quantized.
The numerics are in :mod:`~lightning_compress.modifiers.quantization.kv_cache_math`, training
in :mod:`~lightning_compress.modifiers.quantization.kv_cache_training`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.quantization.attention import AttentionRouting
from lightning_compress.modifiers.quantization.kv_cache_math import (
    fake_quantize_states,
    observe_states,
    state_observer,
    state_scale,
)

__all__ = [
    "ATTENTION_SCHEME_ATTRIBUTE",
    "AttentionCalibration",
    "AttentionScheme",
    "PlannedAttention",
    "check_attention_args",
    "is_attention_scheme",
    "quantized_attention",
]

ATTENTION_SCHEME_ATTRIBUTE = "attention_scheme"
"""The attribute of a calibrated attention module holding its :class:`AttentionScheme`."""

ATTENTION_STRATEGIES = ("tensor", "attn_head")
ATTENTION_OBSERVERS = ("minmax", "moving_average", "mse")


@dataclass(frozen=True)
class AttentionScheme:
    """How one attention module's states are quantized.

    Args:
        keys_values: the arguments of its keys and values (the KV cache).
        queries: the arguments of its queries, or None to leave them unquantized.
    """

    keys_values: QuantizationArgs
    queries: QuantizationArgs | None = None

    def roles(self) -> dict[str, QuantizationArgs]:
        """The quantized states, ``q`` (if any), ``k`` and ``v``, with their arguments.

        Returns:
            Role to arguments; each role's scale is the buffer ``<role>_scale``.
        """
        roles = {} if self.queries is None else {"q": self.queries}
        return {**roles, "k": self.keys_values, "v": self.keys_values}


def check_attention_args(args: QuantizationArgs, where: str) -> None:
    """Refuses arguments the attention states cannot take (what vLLM serves: static fp8).

    Args:
        args: the arguments of a ``kv_cache_scheme`` or an attention group.
        where: the field they come from, for the message.

    Raises:
        ValueError: naming ``where`` and the field.
    """
    checks = (
        ("type", args.type == "float" and args.num_bits == 8 and args.scale_dtype is None,
         "8-bit float (fp8 e4m3, num_bits=8, type='float', scale_dtype=None)",
         f"num_bits={args.num_bits}, type={args.type!r}, scale_dtype={args.scale_dtype!r}"),
        ("strategy", args.strategy in ATTENTION_STRATEGIES,
         f"one of {ATTENTION_STRATEGIES}", repr(args.strategy)),
        ("dynamic", not args.dynamic, "False (the scales are calibrated)", repr(args.dynamic)),
        ("observer", args.observer in ATTENTION_OBSERVERS,
         f"one of {ATTENTION_OBSERVERS}", repr(args.observer)),
    )  # fmt: skip
    for field, ok, expected, got in checks:
        if not ok:
            raise ValueError(f"{where}.{field}: expected {expected}, got {got}")


def is_attention_scheme(scheme: QuantizationScheme) -> bool:
    """Whether a config group quantizes attention (only ``input_activations``, no weights).

    Args:
        scheme: a config group's scheme.

    Returns:
        True for a group of attention modules, whose queries, keys and values it quantizes.
    """
    return (
        scheme.weights is None
        and scheme.output_activations is None
        and scheme.input_activations is not None
    )


def _quantize_with_buffers(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The handler of a calibrated module: its states fake-quantized with its scales."""
    states = {"q": query, "k": key, "v": value}
    for role, args in getattr(module, ATTENTION_SCHEME_ATTRIBUTE).roles().items():
        states[role] = fake_quantize_states(states[role], getattr(module, f"{role}_scale"), args)
    return states["q"], states["k"], states["v"]


@contextmanager
def quantized_attention(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Runs ``model``'s calibrated attention modules with fp8 queries, keys and values.

    Inside the context every module with an ``attention_scheme`` fake-quantizes its states
    with its scales, as vLLM's fp8 KV cache (and fp8 attention) stores and reads them; the
    attention implementation is restored on exit, even after an error.

    Args:
        model: a model whose attention was calibrated (``kv_cache_scheme``).

    Yields:
        The quantized attention modules, by name.

    Raises:
        ValueError: when no module of ``model`` has an ``attention_scheme``, or one cannot be
            routed (see
            :class:`~lightning_compress.modifiers.quantization.attention.AttentionRouting`).
    """
    modules = {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, ATTENTION_SCHEME_ATTRIBUTE)
    }
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no calibrated attention module (none has an "
            f"'{ATTENTION_SCHEME_ATTRIBUTE}'); expected a model compressed with a kv_cache_scheme"
        )
    routing = AttentionRouting(modules, _quantize_with_buffers)
    try:
        yield modules
    finally:
        routing.remove()


# --------------------------------------------------------------------- planned modules
class PlannedAttention(ABC):
    """Attention modules planned for quantization, their attention routed to ``_handle``.

    Args:
        modifier: the modifier that owns the hooks and buffers.
        plan: attention module name to ``(module, scheme)``.
    """

    def __init__(
        self, modifier: Any, plan: Mapping[str, tuple[nn.Module, AttentionScheme]]
    ) -> None:
        self._modifier = modifier
        self._plan = dict(plan)
        self._routing: AttentionRouting | None = None

    def _route(self) -> None:
        """Routes the planned modules' attention to ``_handle``.

        Raises:
            ValueError: naming the modules whose attention cannot be routed.
        """
        modules = {name: module for name, (module, _) in self._plan.items()}
        self._routing = AttentionRouting(modules, self._handle)

    def close(self) -> None:
        """Removes the routing."""
        if self._routing is not None:
            self._routing.remove()
            self._routing = None

    @abstractmethod
    def _handle(
        self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Observes and/or quantizes one routed module's queries, keys and values.

        Args:
            module: the attention module.
            query: its queries.
            key: its keys.
            value: its values.

        Returns:
            The queries, keys and values the attention goes on with.
        """


# --------------------------------------------------------------------- calibration
class _ModuleCalibration:
    """One attention module's observers while it is being calibrated."""

    def __init__(self, name: str, scheme: AttentionScheme) -> None:
        self.name = name
        self.scheme = scheme
        self.observers = {role: state_observer(name, args) for role, args in scheme.roles().items()}
        self.armed = False  # inside a calibration forward of the module
        self.routed = False  # its attention implementation ran during that forward


class AttentionCalibration(PlannedAttention):
    """Calibrates the scales of attention modules one-shot, block by block.

    ``start`` routes the modules' attention (:class:`AttentionRouting`) and gives each a
    pair of forward hooks (owned by ``modifier``, so they go at its finalize, abort or any
    error): during a calibration forward the module's states are observed; a module whose
    forward never reached the attention implementation is refused, naming its class. When
    its block ends (``finish`` with the block) a module's scales are computed (ranges
    reduced across ranks) and added as buffers with the ``attention_scheme`` attribute; with
    ``quantize_calibrated`` its states are fake-quantized from then on, so later blocks are
    calibrated on the quantized attention. ``close`` removes the routing (the scales stay
    for export and :func:`quantized_attention`).

    Args:
        modifier: the modifier that owns the hooks and buffers.
        plan: attention module name to ``(module, scheme)``.
        quantize_calibrated: whether calibrated modules run quantized during the rest of
            the calibration (False: unquantized until ``close``).
    """

    def __init__(
        self,
        modifier: Any,
        plan: Mapping[str, tuple[nn.Module, AttentionScheme]],
        quantize_calibrated: bool = True,
    ) -> None:
        super().__init__(modifier, plan)
        self._pending: dict[nn.Module, _ModuleCalibration] = {}
        self._quantize_calibrated = quantize_calibrated

    def start(self) -> None:
        """Routes the planned modules' attention and hooks them for calibration.

        Raises:
            ValueError: naming the modules whose attention cannot be routed.
        """
        self._route()
        for name, (module, scheme) in self._plan.items():
            self._pending[module] = _ModuleCalibration(name, scheme)
            self._modifier.register_hook(module, self._arm, "forward_pre")
            self._modifier.register_hook(module, self._check_routed, "forward")

    def finish(self, subgraph: nn.Module | None) -> None:
        """Computes and installs the scales of the pending modules inside ``subgraph``.

        Args:
            subgraph: a calibrated block (None: every pending module).

        Raises:
            ValueError: naming the modules that saw no calibration tokens.
        """
        inside = {id(m) for m in subgraph.modules()} if subgraph is not None else None
        done = [m for m in self._pending if inside is None or id(m) in inside]
        scales = {module: self._scales(self._pending[module]) for module in done}
        for module, values in scales.items():
            calibration = self._pending.pop(module)
            for buffer, value in values.items():
                self._modifier.add_buffer(module, buffer, value)
            setattr(module, ATTENTION_SCHEME_ATTRIBUTE, calibration.scheme)
            self._modifier.keep_buffers(module)

    def close(self) -> None:
        """Removes the routing; calibrated modules keep their scales and scheme."""
        super().close()
        self._pending.clear()

    def _scales(self, calibration: _ModuleCalibration) -> dict[str, Tensor]:
        module = self._plan[calibration.name][0]
        dtype = next(module.parameters()).dtype
        scales = {}
        for role, observer in calibration.observers.items():
            observer.reduce_across_ranks()
            if observer.observer.min_vals is None:
                raise ValueError(
                    f"attention module '{calibration.name}' ({type(module).__name__}) saw no "
                    "calibration tokens, so its fp8 key/value scales cannot be calibrated; "
                    "expected calibration data to reach every decoder block"
                )
            args = calibration.scheme.roles()[role]
            scales[f"{role}_scale"] = state_scale(observer.observer, args, dtype)
        return scales

    # ------------------------------------------------------------------ hooks
    def _arm(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        calibration = self._pending.get(module)
        if calibration is not None:
            calibration.armed, calibration.routed = True, False

    def _check_routed(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calibration = self._pending.get(module)
        if calibration is None or not calibration.armed:
            return
        calibration.armed = False
        if not calibration.routed:
            raise ValueError(
                f"attention module '{calibration.name}' ({type(module).__name__}) ran without "
                "calling transformers' attention implementation, so its keys and values "
                "cannot be quantized; expected a module that calls ALL_ATTENTION_FUNCTIONS"
            )

    def _handle(
        self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        calibration = self._pending.get(module)
        if calibration is None:  # calibrated: quantize, unless asked not to
            if self._quantize_calibrated and hasattr(module, ATTENTION_SCHEME_ATTRIBUTE):
                return _quantize_with_buffers(module, query, key, value)
            return query, key, value
        calibration.routed = True
        if calibration.armed:
            states = {"q": query, "k": key, "v": value}
            for role, observer in calibration.observers.items():
                x = states[role].detach()
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(
                        f"attention module '{calibration.name}' computed NaN or Inf "
                        f"{_STATE_NAMES[role]} during calibration; expected finite values"
                    )
                observe_states(observer.observer, x, calibration.scheme.roles()[role])
        return query, key, value


_STATE_NAMES = {"q": "queries", "k": "keys", "v": "values"}

"""Observers: turn the tensors they see into static scales and zero points.

Each observer keeps one min and one max per group of values sharing a scale
(see :func:`~lightning_compress.modifiers.quantization.ops.strategy_groups`), so
every observed tensor must give the same qparams shape. Per-token scales change
with every input: use
:func:`~lightning_compress.modifiers.quantization.ops.compute_dynamic_qparams` for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lightning_compress.modifiers.quantization.args import DYNAMIC_LOCAL, QuantizationArgs
from lightning_compress.modifiers.quantization.formats.scales import global_scale_for
from lightning_compress.modifiers.quantization.ops import (
    calculate_qparams,
    fake_quantize,
    global_scale,
    quant_range,
    reduce_min_max,
    strategy_groups,
)

__all__ = [
    "MSEObserver",
    "MemorylessMSEObserver",
    "MemorylessMinMaxObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "observer_for",
    "qparams_and_global_scale",
    "qparams_for_weight",
]


class Observer(ABC):
    """Accumulates per-group ranges and turns them into qparams.

    Arguments with ``dynamic: local`` (NVFP4 activations) keep one range for the whole
    tensor: only their per-tensor global scale is calibrated (:meth:`get_global_scale`),
    their group scales are computed from each input.

    Args:
        args: the quantization arguments; their strategy picks the groups.

    Attributes:
        global_scale: the per-tensor global scale the scales are stored times (strategy
            ``tensor_group``), set by the caller before qparams are asked for; else None.
    """

    def __init__(self, args: QuantizationArgs) -> None:
        self.args = args
        self.min_vals: Tensor | None = None
        self.max_vals: Tensor | None = None
        self.global_scale: Tensor | None = None

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Observes ``x`` and returns the updated ``(scale, zero_point)``."""
        self.update(x)
        return self.get_qparams()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Folds the ranges of ``x`` into the observer's state.

        Args:
            x: the tensor seen; no gradient flows from it.

        Raises:
            ValueError: when ``x`` gives a different qparams shape than earlier tensors.
        """
        self.update_range(*self.batch_range(x.detach()))

    @torch.no_grad()
    def update_range(self, new_min: Tensor, new_max: Tensor) -> None:
        """Folds already-reduced ranges (e.g. combined across ranks) into the state.

        Args:
            new_min: per-group minima, as ``batch_range`` returns them.
            new_max: per-group maxima.

        Raises:
            ValueError: when the ranges have a different qparams shape than earlier ones.
        """
        if self.min_vals is None or self.max_vals is None:
            self.min_vals, self.max_vals = new_min, new_max
            return
        if new_min.shape != self.min_vals.shape:
            raise ValueError(
                f"{type(self).__name__}: a tensor gives qparams of shape "
                f"{tuple(new_min.shape)}, but earlier tensors gave "
                f"{tuple(self.min_vals.shape)}; call reset() between different tensors"
            )
        self.min_vals, self.max_vals = self._merge(new_min, new_max)

    def get_qparams(self) -> tuple[Tensor, Tensor]:
        """Returns ``(scale, zero_point)`` for the ranges seen so far.

        Raises:
            RuntimeError: when nothing has been observed since creation or reset.
        """
        if self.min_vals is None or self.max_vals is None:
            raise RuntimeError(f"{type(self).__name__} has observed nothing; call update(x)")
        return calculate_qparams(self.min_vals, self.max_vals, self.args, self.global_scale)

    def get_global_scale(self, name: str) -> Tensor:
        """Returns the per-tensor global scale of the range seen so far (``dynamic: local``):
        ``448 * qmax / max|x|``.

        Args:
            name: what was observed (e.g. ``"layer 'q_proj' input"``), for the errors.

        Returns:
            The global scale, float32 of shape ``[1]``.

        Raises:
            RuntimeError: when nothing has been observed since creation or reset.
            ValueError: naming ``name`` when everything observed was zero or not finite.
        """
        if self.min_vals is None or self.max_vals is None:
            raise RuntimeError(f"{type(self).__name__} has observed nothing; call update(x)")
        max_abs = torch.maximum(-self.min_vals.clamp(max=0), self.max_vals.clamp(min=0))
        return global_scale_for(max_abs, quant_range(self.args)[1], name)

    def reset(self) -> None:
        """Forgets everything observed."""
        self.min_vals = None
        self.max_vals = None

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the per-group ``(min, max)`` to record for one tensor (for ``dynamic:
        local`` arguments, the whole tensor's, of shape ``[1]``)."""
        if self.args.dynamic == DYNAMIC_LOCAL:
            return x.amin().reshape(1), x.amax().reshape(1)
        return reduce_min_max(x, self.args)

    @abstractmethod
    def _merge(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        """Combines the stored ranges with a new tensor's ranges."""


class MinMaxObserver(Observer):
    """Keeps the running extremes: the smallest min and largest max ever seen."""

    def _merge(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        return torch.minimum(self.min_vals, new_min), torch.maximum(self.max_vals, new_max)


class MemorylessMinMaxObserver(Observer):
    """Keeps the extremes of the latest tensor only (llm-compressor's ``memoryless_minmax``)."""

    def _merge(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        return new_min, new_max


class MovingAverageMinMaxObserver(Observer):
    """Keeps an exponential moving average of each tensor's min and max.

    The first tensor's ranges are taken as they are; after that
    ``stored += args.averaging_constant * (new - stored)``.
    """

    def _merge(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.args.averaging_constant
        return self.min_vals.lerp(new_min, weight), self.max_vals.lerp(new_max, weight)


class MSEObserver(MinMaxObserver):
    """Shrinks each group's range to minimise the reconstruction error.

    For each tensor, every group tries the ranges ``shrink * (min, max)`` for each factor
    of ``shrinks`` and keeps the one minimising ``sum(|x - fake_quantize(x)| ** norm)`` over
    the group. All groups are searched at once; the loop runs over the factors only, and
    stops early once ``patience`` factors in a row improved no group. Ranges of successive
    tensors are merged as running extremes.

    The factors are ``grid`` values evenly spaced from 1 down to ``min_shrink``, or, when
    ``args.observer_kwargs`` holds llm-compressor's settings, theirs:
    ``expand * (1 - i / grid)`` for ``i < int(maxshrink * grid)`` (``maxshrink`` 0.2, ``grid``
    100, ``patience`` 5, ``expand`` 1 by default there), with their ``norm``.

    Args:
        args: the quantization arguments.
        grid: number of shrink factors tried.
        min_shrink: the smallest shrink factor, in (0, 1].
        norm: exponent of the error; 2.4 weighs large errors a bit more than squared.

    Raises:
        ValueError: when ``grid < 1``, ``min_shrink`` is outside (0, 1], or an
            ``observer_kwargs`` setting is out of its range (the message names it).
    """

    def __init__(
        self, args: QuantizationArgs, grid: int = 100, min_shrink: float = 0.2, norm: float = 2.4
    ) -> None:
        super().__init__(args)
        if grid < 1:
            raise ValueError(f"grid={grid!r} is invalid: expected an int >= 1")
        if not 0 < min_shrink <= 1:
            raise ValueError(f"min_shrink={min_shrink!r} is invalid: expected a number in (0, 1]")
        self.shrinks = torch.linspace(1.0, min_shrink, grid).tolist()
        self.norm = norm
        self.patience: int | None = None
        if args.observer_kwargs:
            self._use_reference_settings(dict(args.observer_kwargs))

    def _use_reference_settings(self, kwargs: dict[str, float]) -> None:
        """Takes llm-compressor's ``observer_kwargs`` (and its defaults for those not given)."""
        settings = {**_REFERENCE_MSE_SETTINGS, **kwargs}
        for key, (low, high) in _REFERENCE_MSE_RANGES.items():
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"observer_kwargs.{key}={value!r} is invalid: expected a number")
            if not low <= value <= high:
                raise ValueError(
                    f"observer_kwargs.{key}={value!r} is invalid: expected a number in "
                    f"[{low}, {high}]"
                )
        grid, expand = settings["grid"], settings["expand"]
        steps = int(settings["maxshrink"] * grid)
        if steps < 1:
            raise ValueError(
                f"observer_kwargs maxshrink={settings['maxshrink']!r} and grid={grid!r} try no "
                "range: expected maxshrink * grid >= 1"
            )
        self.shrinks = [expand * (1 - step / grid) for step in range(steps)]
        self.norm = settings["norm"]
        self.patience = int(settings["patience"])

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        min_vals, max_vals = super().batch_range(x)
        best_min, best_max = min_vals, max_vals
        best_error = torch.full(min_vals.shape, torch.inf, device=x.device)
        stale = 0
        for shrink in self.shrinks:
            shrunk_min, shrunk_max = min_vals * shrink, max_vals * shrink
            error = self._error(x, shrunk_min, shrunk_max)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_min = torch.where(better, shrunk_min, best_min)
            best_max = torch.where(better, shrunk_max, best_max)
            stale = 0 if bool(better.any()) else stale + 1
            if self.patience is not None and stale >= self.patience:
                break
        return best_min, best_max

    def _error(self, x: Tensor, min_vals: Tensor, max_vals: Tensor) -> Tensor:
        """Returns the per-group error of fake quantizing ``x`` with the given ranges."""
        scale, zero_point = calculate_qparams(min_vals, max_vals, self.args, self.global_scale)
        x_hat = fake_quantize(x, scale, zero_point, self.args, self.global_scale)
        error = (x_hat - x).abs().float().pow(self.norm)
        return strategy_groups(error, self.args).sum(dim=-1)


class MemorylessMSEObserver(MSEObserver):
    """:class:`MSEObserver` keeping the latest tensor's shrunk ranges only (llm-compressor's
    ``memoryless_mse``)."""

    def _merge(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        return new_min, new_max


_REFERENCE_MSE_SETTINGS = {"maxshrink": 0.2, "grid": 100, "norm": 2.4, "patience": 5, "expand": 1}
"""llm-compressor's defaults for the MSE observers' ``observer_kwargs``."""
_REFERENCE_MSE_RANGES = {
    "maxshrink": (0, 1),
    "grid": (1, float("inf")),
    "norm": (1e-6, float("inf")),
    "patience": (0, float("inf")),
    "expand": (1, float("inf")),
}
"""The values each of those settings accepts."""


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "memoryless_minmax": MemorylessMinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "mse": MSEObserver,
    "memoryless_mse": MemorylessMSEObserver,
}


def observer_for(args: QuantizationArgs) -> Observer:
    """Builds a fresh observer of the kind ``args.observer`` names.

    Args:
        args: the quantization arguments.

    Returns:
        The observer, with default settings.

    Raises:
        ValueError: when ``args.observer`` names no observer; the message lists them.
    """
    observer_class = _OBSERVERS.get(args.observer)
    if observer_class is None:
        raise ValueError(f"unknown observer {args.observer!r}; observers are {list(_OBSERVERS)}")
    return observer_class(args)


def qparams_for_weight(
    weight: Tensor,
    args: QuantizationArgs,
    observer: Observer | None = None,
    global_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Computes a weight's scales and zero points.

    Args:
        weight: the weight, ``[out, in]`` for a linear layer.
        args: the quantization arguments; ``tensor``, ``channel``, ``group`` or
            ``tensor_group`` strategy.
        observer: the observer to use; None builds a fresh one from ``args.observer``.
        global_scale: the weight's per-tensor global scale
            (:func:`~lightning_compress.modifiers.quantization.ops.global_scale`), required by
            and only used with ``tensor_group``.

    Returns:
        ``(scale, zero_point)`` of the strategy's qparams shape; with a global scale the
        scales are stored times it.

    Raises:
        ValueError: for the ``token`` strategy, which is for activations, or ``tensor_group``
            without a global scale.
    """
    if args.strategy == "token":
        raise ValueError(
            "strategy='token' is for activations; weights take 'tensor', 'channel', 'group' "
            "or 'tensor_group'"
        )
    if (args.strategy == "tensor_group") != (global_scale is not None):
        raise ValueError(
            f"global_scale is required by strategy='tensor_group' and only allowed with it; "
            f"got strategy={args.strategy!r} with global_scale={global_scale!r}"
        )
    if observer is None:
        observer = observer_for(args)
    observer.global_scale = global_scale
    return observer(weight)


def qparams_and_global_scale(
    weight: Tensor, args: QuantizationArgs, name: str = "the weight"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A weight's scales and zero points with the global scale of strategy ``tensor_group``
    computed from the weight itself.

    Args:
        weight: the weight.
        args: its quantization arguments.
        name: what the weight is, for the error (e.g. ``"layer 'q_proj' weight"``).

    Returns:
        ``(scale, zero_point, global_scale)``; the global scale is None unless
        ``tensor_group``.

    Raises:
        ValueError: naming the weight when ``tensor_group`` meets one that is all zero or
            not finite.
    """
    tensor_scale = None
    if args.strategy == "tensor_group":
        tensor_scale = global_scale(weight, args, name)
    return (*qparams_for_weight(weight, args, global_scale=tensor_scale), tensor_scale)

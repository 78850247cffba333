"""``AWQModifier``: activation-aware scales searched to protect the salient weight columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_compress.core.distributed import (
    all_gather_or_raise,
    balanced_owners,
    is_distributed,
    rank_and_world_size,
)
from lightning_compress.core.events import Event
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.hessian_collector import HessianCollector, mask_sources
from lightning_compress.modifiers.input_scaling import follow_input_scaling
from lightning_compress.modifiers.quantization.args import QuantizationArgs, preset_scheme
from lightning_compress.modifiers.quantization.observers import qparams_and_global_scale
from lightning_compress.modifiers.quantization.ops import fake_quantize, strategy_groups, ungroup
from lightning_compress.modifiers.quantization.schemes import QuantizationSchemes
from lightning_compress.modifiers.smoothing.base import SmoothingModifier
from lightning_compress.modifiers.smoothing.folding import SmoothingMapping, linear_weight
from lightning_compress.modifiers.smoothing.routing import RoutedHessians
from lightning_compress.recipe.errors import RecipeError

__all__ = ["AWQModifier", "AWQResult", "awq_search"]

MIN_SCALE = 1e-4
DEFAULT_SCHEME = "W4A16_ASYM"
"""The preset AWQ searches with when neither its settings nor its stage give one."""
"""Floor of a grid scale, and what is added to the weight magnitude it is divided by."""


@dataclass(frozen=True)
class AWQResult:
    """What :func:`awq_search` chose.

    Args:
        scale: ``[channels]``, the scale to smooth with.
        ratio: its exponent on the grid, or None when no grid scale beat ``s = 1``.
        loss: its loss (mean squared output error per token).
        unscaled_loss: the loss of ``s = 1``.
        duo_scaling: whether it divides by the weight magnitude (None for ``s = 1``).
    """

    scale: Tensor
    ratio: float | None
    loss: float
    unscaled_loss: float
    duo_scaling: bool | None = None


def awq_search(
    weights: Sequence[Tensor],
    hessians: Sequence[Tensor],
    act_mean: Tensor,
    args: QuantizationArgs,
    n_grid: int = 20,
    duo_scaling: bool | Literal["both"] = True,
) -> AWQResult:
    """AWQ's grid search for the scale of one mapping's balance layers.

    For each ``r`` in ``linspace(0, 1, n_grid)`` the candidate is ``s = x^r`` (``x``: the mean
    ``|x|`` of each input channel), or ``s = x^r / (w^(1 - r) + 1e-4)`` with ``duo_scaling``
    (``w``: the mean over rows of ``|W|`` normalized by its quantization group's maximum),
    clamped to at least ``1e-4`` and divided by ``sqrt(max(s) * min(s))``. Its loss is the
    output error of the balance layers with weights ``Q(W diag(s)) diag(1/s)``, ``Q`` the
    weight fake-quantization of ``args``:

        ``loss(s) = sum_l tr(dW_l H_l dW_l^T) / 2``, ``dW_l = W_l - Q(W_l diag(s)) diag(1/s)``,

    which with ``H = (2 / n) sum x x^T`` is the mean over the ``n`` calibration tokens of the
    squared output errors, summed over the layers' outputs: every token counts, at a cost
    independent of their number. The best candidate is kept if it beats ``s = 1``. With
    ``duo_scaling="both"`` (llm-compressor's) the grid has ``n_grid // 2`` exponents, each tried
    without and with the weight magnitude, and the best of all is kept.

    Args:
        weights: the balance layers' weights ``[out, in]`` (not modified); layers reading
            the same input may come stacked as one.
        hessians: the input Hessian ``[in, in]`` of each weight.
        act_mean: ``[in]``, the mean ``|x|`` of each input channel.
        args: the weight quantization the balance layers will get.
        n_grid: grid points.
        duo_scaling: divide by the weight magnitude too; ``"both"``: try each exponent both
            ways.

    Returns:
        The chosen scale with its ratio and loss.

    Raises:
        ValueError: when the weights do not fit ``args`` (e.g. a group size that does not
            divide the input channels).
    """
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    device = weights[0].device
    weights = [weight.detach().to(dtype) for weight in weights]
    hessians = [hessian.to(device=device, dtype=dtype) for hessian in hessians]
    act = act_mean.to(device=device, dtype=dtype)
    magnitude = _weight_magnitude(torch.cat(weights), args) if duo_scaling else None
    modes = [False, True] if duo_scaling == "both" else [bool(duo_scaling)]
    points = max(n_grid // 2, 1) if duo_scaling == "both" else n_grid

    def loss_of(scale: Tensor) -> float:
        return sum(_output_error(w, h, scale, args) for w, h in zip(weights, hessians, strict=True))

    unscaled = torch.ones_like(act)
    best = AWQResult(unscaled, None, loss_of(unscaled), loss_of(unscaled))
    ratios = torch.linspace(0, 1, points, dtype=torch.float64).tolist() if points > 1 else [0.0]
    for ratio in ratios:
        for duo in modes:
            scale = _grid_scale(act, magnitude if duo else None, ratio)
            loss = loss_of(scale)
            if loss < best.loss:
                best = AWQResult(scale, ratio, loss, best.unscaled_loss, duo)
    return best


class SearchInputs(NamedTuple):
    """What :func:`awq_search` reads for one mapping (see its arguments)."""

    weights: list[Tensor]
    hessians: list[Tensor]
    act_mean: Tensor
    args: QuantizationArgs


def independent_searches(mappings: Sequence[SmoothingMapping]) -> bool:
    """Whether every mapping's search reads nothing that smoothing an earlier mapping of
    ``mappings`` changes (its balance layers are no earlier mapping's smooth layer, balance
    layer or passenger), so that all searches may run before any mapping is applied.

    Args:
        mappings: the mappings, in the order they are applied.

    Returns:
        True when the searches are independent.
    """
    changed: set[str] = set()
    for mapping in mappings:
        if changed.intersection(mapping.balance_names):
            return False
        changed.update((mapping.smooth_name, *mapping.balance_names, *mapping.passenger_names))
    return True


def _grid_scale(act: Tensor, magnitude: Tensor | None, ratio: float) -> Tensor:
    scale = act.pow(ratio)
    if magnitude is not None:
        scale = scale / (magnitude.pow(1 - ratio) + MIN_SCALE)
    scale = scale.clamp(min=MIN_SCALE)
    return scale / (scale.max() * scale.min()).sqrt()


def _weight_magnitude(weight: Tensor, args: QuantizationArgs) -> Tensor:
    """Mean over rows of ``|W|`` normalized by the largest ``|w|`` of its quantization group."""
    groups = strategy_groups(weight.abs(), args)
    normalized = groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)
    return ungroup(normalized, weight.shape, args).mean(dim=0)


def _output_error(weight: Tensor, hessian: Tensor, scale: Tensor, args: QuantizationArgs) -> float:
    scaled = weight * scale
    qscale, zero_point, tensor_scale = qparams_and_global_scale(scaled, args)
    quantized = fake_quantize(scaled, qscale, zero_point, args, tensor_scale)
    delta = weight - quantized / scale
    return float(((delta @ hessian) * delta).sum()) / 2


class AWQModifier(SmoothingModifier):
    """AWQ (activation-aware weight quantization), the smoothing half: for each mapping, search
    the scale that minimizes the balance layers' output error once their weights are quantized,
    and fold it in (see :func:`awq_search`). A following ``QuantizationModifier`` (or
    ``GPTQModifier``) with the same weight scheme quantizes; AWQ itself leaves the weights in
    full precision.

    The error is measured on the balance layers' outputs, through their input Hessians: exact
    over every calibration token (padding excluded, summed over ranks), at a search cost that
    does not grow with the number of tokens, and with no need to run the attention again for
    each candidate. The layers of a mixture's experts count each token they are routed to
    with its router weight, so their error is the one the block's output gets under the real
    routing, even when every expert calibrates on every token (see
    :mod:`~lightning_compress.modifiers.smoothing.routing`). The mappings are found on each
    block (see :class:`~lightning_compress.modifiers.smoothing.base.SmoothingModifier`).

    After calibration ``results`` holds each smooth layer's :class:`AWQResult`.

    Without ``scheme`` and ``weights`` the search quantizes each mapping's balance layers as
    the quantizing modifiers of its recipe stage (``QuantizationModifier``, ``GPTQModifier``)
    will, as llm-compressor's AWQ does; layers none of them targets are searched with
    ``W4A16_ASYM``.

    Args:
        scheme: the preset whose weight arguments the search quantizes with (e.g.
            ``W4A16_ASYM``: asymmetric int4 in groups of 128); None: see above.
        weights: quantization arguments instead of the preset's, e.g. ``{num_bits: 4,
            symmetric: true, strategy: group, group_size: 64}``.
        n_grid: grid points for the exponent, from 0 to 1.
        duo_scaling: divide the activation magnitude by the weight magnitude (AWQ's
            ``duo_scaling``); ``"both"``: half the grid points, each tried both ways, the
            better kept per mapping (llm-compressor's ``"both"``).
        mappings: explicit mappings instead of finding them (see ``SmoothingModifier``).
        targets: the linear layers that may be smooth or balance layers.
        ignore: layers never smoothed.
        start: -1: one-shot.
    """

    scheme: str | None = None
    weights: dict[str, Any] | None = None
    n_grid: int = 20
    duo_scaling: bool | Literal["both"] = True

    _quantizers: tuple[QuantizationSchemes, ...] = ()  # the stage's, when it borrows schemes

    statistic_kind = "mean"

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if self.n_grid < 1:
            self.fail("n_grid", "an int >= 1")
        self._weight_args = self._resolve_weight_args()
        super().validate()

    def _resolve_weight_args(self) -> QuantizationArgs:
        name = type(self).__name__
        if self.weights is not None:
            try:
                args = QuantizationArgs.from_dict(self.weights, where="weights")
            except ValueError as err:
                raise RecipeError(f"{name}.{err}") from err
        else:
            try:
                args = preset_scheme(self.scheme or DEFAULT_SCHEME, ["Linear"]).weights
            except ValueError as err:
                raise RecipeError(f"{name}.scheme: {err}") from err
        if args is None or args.strategy == "token" or args.dynamic:
            raise RecipeError(
                f"{name}.weights: expected static weight arguments with strategy 'tensor', "
                f"'channel' or 'group', got {args!r}"
            )
        return args

    def join_stage(self, stage: str, modifiers: list[Modifier]) -> None:
        """Without ``scheme`` and ``weights``, searches with the schemes of the stage's
        quantizing modifiers (read from the model at ``initialize``).

        Args:
            stage: the stage's name.
            modifiers: the stage's modifiers.
        """
        if self.scheme is None and self.weights is None:
            self._quantizers = tuple(m for m in modifiers if isinstance(m, QuantizationSchemes))

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        super().on_initialize(state, **kwargs)
        self.results: dict[str, AWQResult] = {}
        self._layer_args: dict[str, QuantizationArgs] = {}
        for quantizer in self._quantizers:
            for name, layer in quantizer.plan_layers(state.model).items():
                self._layer_args[name] = layer.settings.weights
        widths = {name: linear_weight(layer).shape[1] for name, layer in self._linears.items()}
        bad = [
            f"{name} ({n} inputs)"
            for name, n in widths.items()
            if name not in self._layer_args
            and self._weight_args.group_size
            and n % self._weight_args.group_size
        ]
        size = self._weight_args.group_size
        if bad:
            raise RecipeError(
                f"{type(self).__name__}.weights: group_size {size} does not divide the input "
                f"channels of {bad}; expected a group_size that divides them, or add these "
                "layers to ignore"
            )

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        super().on_start(state, event, **kwargs)
        self._routed = RoutedHessians(state.model, self._linears)
        plain = {name: layer for name, layer in self._linears.items() if name not in self._routed}
        self._hessians = HessianCollector()
        self._hessians.follow_input_scaling(plain)
        for name, layer in plain.items():
            self.register_hook(layer, self._hessians.layer_hook(name), "forward_pre")
        for module in self._routed.mixtures:
            self.register_hook(module, self._routed.experts_hook, "forward_pre")
        routed = {name: self._linears[name] for name in self._routed.names}
        self._routing_scales = follow_input_scaling(routed, self._routed.rescale_inputs)
        for name, layer in routed.items():
            self.register_hook(layer, self._routed.layer_hook(name), "forward_pre")
        for module in mask_sources(state.model, self._linears):
            for hook in (self._hessians.mask_hook(module), self._routed.masks.hook(module)):
                self.register_hook(module, hook, "forward_pre", with_kwargs=True)

    def compute_scale(self, mapping: SmoothingMapping) -> Tensor:
        """AWQ's scale for one mapping (see :func:`awq_search`).

        Args:
            mapping: the layers.

        Returns:
            ``s``, ``[channels]``.
        """
        result = self._search(self._search_inputs(mapping))
        self.results[mapping.smooth_name] = result
        return result.scale

    def compute_scales(self, mappings: Sequence[SmoothingMapping]) -> Iterable[Tensor]:
        """The scales of a block's mappings; under several processes each mapping's search
        runs on one owner rank (balancing the estimated work) and its result is shared, when
        no search reads what smoothing an earlier mapping changes
        (:func:`independent_searches`); otherwise every rank searches every mapping.

        An error in a search is raised on every rank.

        Args:
            mappings: the block's mappings, in the order they are applied.

        Returns:
            The scales, in that order.
        """
        if not is_distributed() or not independent_searches(mappings):
            return super().compute_scales(mappings)
        inputs = [self._search_inputs(mapping) for mapping in mappings]  # reduced on all ranks
        # each grid point quantizes the weights and runs the cached inputs through them
        costs = [sum(weight.numel() for weight in each.weights) for each in inputs]
        rank, world_size = rank_and_world_size()
        owners = balanced_owners(costs, world_size)
        found: dict[int, AWQResult] = {}
        error = None
        try:
            for index, each in enumerate(inputs):
                if owners[index] == rank:
                    result = self._search(each)
                    found[index] = replace(result, scale=result.scale.cpu())  # sent by pickle
        except Exception as err:  # raised on every rank by all_gather_or_raise
            error = err
        for part in all_gather_or_raise(found, error):
            found.update(part)
        scales = []
        for index, (mapping, each) in enumerate(zip(mappings, inputs, strict=True)):
            result = found[index]
            result = replace(result, scale=result.scale.to(each.act_mean.device))
            self.results[mapping.smooth_name] = result
            scales.append(result.scale)
        return scales

    def _search(self, inputs: SearchInputs) -> AWQResult:
        """:func:`awq_search` with this modifier's grid settings."""
        return awq_search(*inputs, self.n_grid, self.duo_scaling)

    def _search_inputs(self, mapping: SmoothingMapping) -> SearchInputs:
        """The balance layers' weights, Hessians and input magnitude for the search of
        ``mapping``, reduced over ranks (a collective call), and their weight arguments."""
        layers = mapping.named_balances
        act = self._statistic.magnitude(layers)
        routed = {name: layer for name, layer in layers.items() if name in self._routed}
        plain = {name: layer for name, layer in layers.items() if name not in routed}
        accumulators = self._hessians.reduced(plain)
        shared: dict[int, list[Tensor]] = {}  # layers reading one input: one stacked weight
        for name, layer in plain.items():
            shared.setdefault(id(accumulators[name]), []).append(linear_weight(layer))
        hessians = {id(acc): acc.hessian() for acc in accumulators.values()}
        weights = [torch.cat(stacked) for stacked in shared.values()]
        weights += [linear_weight(layer) for layer in routed.values()]
        return SearchInputs(
            weights,
            [hessians[key] for key in shared] + list(self._routed.reduced(routed).values()),
            act,
            self._search_args(mapping),
        )

    def _search_args(self, mapping: SmoothingMapping) -> QuantizationArgs:
        """The weight arguments the balance layers of ``mapping`` will be quantized with.

        Raises:
            RecipeError: when they differ between the layers, or AWQ cannot search them.
        """
        found = {
            name: self._layer_args.get(name, self._weight_args) for name in mapping.named_balances
        }
        kinds = set(found.values())
        owner = type(self).__name__
        if len(kinds) > 1:
            raise RecipeError(
                f"{owner}: the balance layers of '{mapping.smooth_name}' are quantized with "
                f"different weight arguments ({found}); expected one scheme for the layers "
                f"of a mapping, or {owner}.weights to search with"
            )
        (args,) = kinds
        if args.strategy == "token" or args.dynamic:
            raise RecipeError(
                f"{owner}: the balance layers of '{mapping.smooth_name}' are quantized with "
                f"{args!r}; expected static weight arguments (strategy 'tensor', 'channel' or "
                f"'group'), or {owner}.weights to search with"
            )
        return args

    def release_block(self, names: list[str]) -> None:
        self._hessians.discard(names)
        self._routed.discard(names)

    def release_all(self) -> None:
        self._hessians.clear()
        self._routed.clear()
        for handle in self._routing_scales:
            handle.remove()

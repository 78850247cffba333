"""Steps shared by one-shot modifiers that compress each ``nn.Linear`` from its calibration inputs.

GPTQ, SparseGPT, Wanda and round-to-nearest hook the targeted layers at calibration start,
gather statistics of their inputs, reduce them across ranks and compress each block's layers at
its SEQUENTIAL_EPOCH_END; :mod:`~lightning_compress.modifiers.layerwise_modifier` holds that
flow. The helpers here are its method-independent parts (smoothing uses some): the base of the
statistics collectors, the attention-mask bookkeeping that keeps padded tokens out of the
statistics, the error for a run without data, the checks that every layer saw tokens and that
weights and input statistics are finite, which layers a subgraph holds, and a Hessian solve
whose errors name the layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.core.model_layer import match_named_modules
from lightning_compress.modifiers.hessian import (
    HessianAccumulator,
    HessianWorkspace,
    SingularHessianError,
    all_finite,
)
from lightning_compress.modifiers.input_scaling import follow_input_scaling
from lightning_compress.recipe.errors import RecipeError

__all__ = [
    "InputStatistics",
    "StatisticsCollector",
    "TokenMaskTracker",
    "check_calibrated",
    "check_finite_inputs",
    "check_finite_weights",
    "layers_inside",
    "linear_layers",
    "linear_layers_within",
    "modules_inside",
    "needs_data",
    "solve_on_hessian",
    "token_mask",
]

Result = TypeVar("Result")


class InputStatistics(Protocol):
    """What a collector holds per layer after reduction: at least the tokens it saw."""

    @property
    def num_samples(self) -> int:
        """Tokens accumulated, over all ranks."""


def token_mask(mask: Any) -> Tensor | None:
    """The ``[batch, seq]`` boolean mask of real tokens an attention mask describes.

    Args:
        mask: ``[batch, seq]`` (non-zero: a real token), or ``[batch, heads, seq, seq]``
            boolean (True: may attend) or additive (0: may attend); anything else is ignored.

    Returns:
        True for real tokens, or None when ``mask`` says nothing usable.
    """
    if not isinstance(mask, Tensor):
        return None
    if mask.dim() == 2:
        return mask != 0
    if mask.dim() == 4 and mask.shape[-1] == mask.shape[-2]:
        diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        return diagonal if mask.dtype == torch.bool else diagonal == 0
    return None


class TokenMaskTracker:
    """Keeps the token mask of the latest forward of the modules taking an ``attention_mask``.

    Register :meth:`hook` (a forward pre-hook with kwargs) on the layers' ancestors that take
    an ``attention_mask`` (``hessian_collector.mask_sources``); :meth:`mask_for` then gives
    the ``[batch, seq]`` mask of real tokens for a layer input of that layout. A ``[batch,
    heads, seq, seq]`` mask gives its diagonal: a real token may attend to itself.
    """

    def __init__(self) -> None:
        self._mask: ContextVar[Tensor | None] = ContextVar(f"token_mask_{id(self)}", default=None)

    @property
    def current(self) -> Tensor | None:
        """The token mask of the latest forward in this context (the sequential pipeline runs
        each calibration batch of a staged block in its own greenlet, with its own context)."""
        return self._mask.get()

    @current.setter
    def current(self, mask: Tensor | None) -> None:
        self._mask.set(mask)

    def hook(self, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        """The forward pre-hook (``with_kwargs=True``) recording ``module``'s attention mask.

        Args:
            module: a module whose ``forward`` takes ``attention_mask``.

        Returns:
            The hook.
        """
        signature = inspect.signature(module.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            try:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
            self.current = token_mask(mask)

        return hook

    def mask_for(self, x: Tensor) -> Tensor | None:
        """The mask of real tokens for the layer input ``x``.

        Args:
            x: a layer input ``[batch, seq, in_features]``, or ``[batch * seq, in_features]``
                with the tokens flattened (a mixture's experts and routers read them so).

        Returns:
            A bool mask shaped ``x.shape[:-1]``, or None when no mask fits.
        """
        mask = self.current
        if mask is None:
            return None
        if mask.shape == x.shape[:-1]:
            return mask
        return mask.reshape(-1) if x.dim() == 2 and x.shape[0] == mask.numel() else None


class StatisticsCollector:
    """Base of the collectors of per-layer input statistics (``HessianCollector``,
    ``ChannelStatisticCollector``).

    Feed one with :meth:`layer_hook` (a forward pre-hook per layer) and :meth:`mask_hook`
    (forward pre-hooks with kwargs on ``hessian_collector.mask_sources``); read the
    statistics, summed across ranks, with :meth:`reduced`. Subclasses fold each input into
    their statistics in :meth:`observe` (skipping the padded tokens ``masks`` reports),
    correct them in :meth:`rescale_inputs`, and give :meth:`reduced` and :meth:`discard`.

    Attributes:
        num_reads: distinct layer inputs folded in on this rank.
        masks: the attention mask of the latest forward.
    """

    def __init__(self) -> None:
        self.num_reads = 0
        self.masks = TokenMaskTracker()
        self._scale_hooks: list[RemovableHandle] = []

    def real_rows(self, x: Tensor) -> Tensor:
        """``x`` flattened to ``[tokens, features]``, padded tokens left out where masked."""
        rows = x.detach().reshape(-1, x.shape[-1])
        mask = self.masks.mask_for(x)
        if mask is None:
            return rows
        return rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]

    def layer_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """The forward pre-hook that feeds layer ``name``'s input to :meth:`observe`.

        Args:
            name: the layer's name.

        Returns:
            The hook.
        """

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.observe(name, args[0])

        return hook

    def mask_hook(self, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        """The forward pre-hook (``with_kwargs=True``) recording ``module``'s attention mask.

        Args:
            module: a module whose ``forward`` takes ``attention_mask``.

        Returns:
            The hook.
        """
        return self.masks.hook(module)

    def observe(self, name: str, x: Tensor) -> None:
        """Folds the input ``x`` of layer ``name`` into its statistics.

        Args:
            name: the layer's name.
            x: its input ``[..., in_features]``.
        """
        raise NotImplementedError

    def follow_input_scaling(self, layers: dict[str, nn.Module]) -> None:
        """Keeps the statistics of ``layers`` exact when smoothing rescales their inputs.

        Registers input-scale hooks (:mod:`~lightning_compress.modifiers.input_scaling`) that
        call :meth:`rescale_inputs` when a smoothing modifier divides the inputs of some of
        ``layers`` by ``s`` after they were observed. Calling it again replaces the hooks;
        :meth:`clear` removes them.

        Args:
            layers: the observed layers, by name.
        """
        self._remove_scale_hooks()
        self._scale_hooks = follow_input_scaling(layers, self.rescale_inputs)

    def rescale_inputs(self, names: list[str], scale: Tensor) -> None:
        """Corrects the statistics of ``names`` for inputs that are now ``x / scale``.

        Args:
            names: the layers whose inputs were divided by ``scale``.
            scale: ``[in_features]``.
        """
        raise NotImplementedError

    def reduced(self, layers: dict[str, nn.Linear]) -> Mapping[str, InputStatistics]:
        """Every layer's statistics, summed over all ranks (a collective call).

        Every rank must call this with the same layers in the same order.

        Args:
            layers: the layers, by name.

        Returns:
            The reduced statistics, by name.
        """
        raise NotImplementedError

    def discard(self, names: Iterable[str]) -> None:
        """Frees the statistics of ``names``.

        Args:
            names: the layers.
        """
        raise NotImplementedError

    def clear(self) -> None:
        """Forgets the latest attention mask and stops following input scaling.

        Subclasses also free their statistics.
        """
        self.masks.current = None
        self._remove_scale_hooks()

    def _remove_scale_hooks(self) -> None:
        for handle in self._scale_hooks:
            handle.remove()
        self._scale_hooks = []


def needs_data(owner: str, what: str) -> RecipeError:
    """The error for a modifier that needs calibration data and got none.

    Args:
        owner: the modifier's class name.
        what: what happened, e.g. ``"finalize ran without calibration"``.

    Returns:
        The error, naming the ways to pass calibration data.
    """
    return RecipeError(
        f"{owner} needs calibration data, but {what}; run it with calibration data, e.g. "
        "oneshot(model, recipe, dataset=...) or Trainer(inference_mode=False).validate("
        "CalibrationModule(model, recipe), dataloaders=...), not with the data_free pipeline"
    )


def linear_layers(owner: str, layers: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """Checks that every targeted layer is an ``nn.Linear``.

    Args:
        owner: the modifier's class name.
        layers: the resolved targets, by name.

    Returns:
        ``layers``.

    Raises:
        RecipeError: naming the first layer that is not a ``Linear``.
    """
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            why = (
                f"{owner} needs a layer's input activations and an embedding's inputs are "
                "token ids, so it has no input Hessian: quantize embeddings with "
                "QuantizationModifier (weights only), or add the layer to ignore"
                if isinstance(module, nn.Embedding)
                else "narrow targets or add the layer to ignore"
            )
            raise RecipeError(
                f"{owner}.targets: layer '{name}' is a {type(module).__name__}; expected "
                f"Linear layers ({why})"
            )
    return layers


def linear_layers_within(
    owner: str, model: nn.Module, targeted: Mapping[str, nn.Module], ignore: list[str]
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers the targeted modules are or hold (llm-compressor's meaning of
    a pruning target: ``model.layers.0`` prunes the linear layers of that decoder layer).

    A targeted ``Linear`` stands for itself; any other targeted module for the ``Linear``
    layers inside it that ``ignore`` leaves (routers only where a target names them, as
    for a ``Linear`` target).

    Args:
        owner: the modifier's class name.
        model: the model.
        targeted: the modules the targets select (``ignore`` already applied), by name.
        ignore: the modifier's ignore patterns, applied to the layers inside too.

    Returns:
        The layers, by name, in model order.

    Raises:
        RecipeError: naming a targeted module that holds no such layer (and lies inside no
            other targeted module that does), e.g. a norm.
    """
    try:
        candidates = match_named_modules(model, ["Linear"], ignore)
    except ValueError:
        candidates = {}
    own = {name for name, module in targeted.items() if isinstance(module, nn.Linear)}
    containers = [name for name in targeted if name not in own]
    chosen = {
        name
        for name in candidates
        if any(name.startswith(f"{container}.") for container in containers)
    }
    chosen |= own
    for name, module in targeted.items():
        if name in own or any(layer.startswith(f"{name}.") for layer in chosen):
            continue
        if any(name.startswith(f"{other}.") for other in targeted if other != name):
            continue  # a part of another targeted module, which holds the layers
        raise RecipeError(
            f"{owner}.targets: module '{name}' is a {type(module).__name__} holding no Linear "
            "layer outside ignore; expected Linear layers or modules that hold them (narrow "
            "targets or add the module to ignore)"
        )
    return {name: module for name, module in model.named_modules() if name in chosen}


def layers_inside(owner: str, subgraph: Any, layers: Mapping[str, nn.Module]) -> list[str]:
    """The names of ``layers`` that are submodules of ``subgraph``, in ``layers``' order.

    Args:
        owner: the modifier's class name.
        subgraph: what SEQUENTIAL_EPOCH_END was given as ``subgraph``.
        layers: the layers still to compress, by name.

    Returns:
        The names.

    Raises:
        ValueError: when ``subgraph`` is not a module.
    """
    if not isinstance(subgraph, nn.Module):
        raise ValueError(
            f"{owner}: SEQUENTIAL_EPOCH_END needs subgraph=<the module just calibrated>, "
            f"got {subgraph!r}"
        )
    inside = {id(module) for module in subgraph.modules()}
    return [name for name, module in layers.items() if id(module) in inside]


def modules_inside(subgraph: nn.Module, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The ``modules`` that are submodules of ``subgraph`` (or ``subgraph`` itself), in order.

    Args:
        subgraph: a block.
        modules: candidate modules.

    Returns:
        Those inside ``subgraph``.
    """
    inside = {id(module) for module in subgraph.modules()}
    return [module for module in modules if id(module) in inside]


def check_calibrated(owner: str, statistics: Mapping[str, InputStatistics], num_reads: int) -> None:
    """Refuses layers that saw no tokens on any rank.

    Every rank must call it with the same reduced statistics (it reduces ``num_reads`` only
    when some layer is empty, which then holds on every rank).

    Args:
        owner: the modifier's class name.
        statistics: each layer's statistics, reduced over ranks.
        num_reads: layer inputs this rank folded in.

    Raises:
        RecipeError: when no calibration batch reached the layers on any rank.
        ValueError: when only some layers saw no tokens; the message names them.
    """
    empty = [name for name, stats in statistics.items() if stats.num_samples == 0]
    if not empty:
        return
    reads = all_reduce_sum_(torch.tensor([num_reads]))
    if int(reads.item()) == 0:
        raise needs_data(owner, "no calibration batch reached its layers")
    raise ValueError(
        f"{owner}: layer(s) {empty} received no calibration tokens; expected every targeted "
        "layer to run on calibration data (check that the model's forward calls them, and "
        "that the attention mask keeps tokens), or add them to ignore"
    )


def check_finite_weights(owner: str, layers: Mapping[str, nn.Module]) -> None:
    """Refuses layers whose weight holds NaN or Inf, before anything is changed.

    One non-finite weight would spread through the layer's compression (a whole quantized row
    or pruning decision) and, through its outputs, into the statistics of later layers, where
    the error would name the wrong layer.

    Args:
        owner: the modifier's class name.
        layers: the layers it will change or read, by name (those without a weight are
            skipped; a parametrized weight is checked as stored). Every rank must call it
            with the same layers (a sharded weight is gathered).

    Raises:
        ValueError: naming the first layer with a non-finite weight, how many values are not
            finite and where the first one is.
    """
    for name, module in layers.items():
        weight = _stored_weight(module)
        if weight is None or all_finite(weight):
            continue
        bad = ~torch.isfinite(weight)
        first = bad.nonzero()[0]
        raise ValueError(
            f"{owner}: the weight of layer '{name}' holds NaN or Inf ({int(bad.sum())} "
            f"value(s), the first {float(weight[tuple(first)])} at {first.tolist()}); expected "
            "finite weights (check how the model was loaded or trained), or add the layer to "
            "ignore"
        )


def _stored_weight(module: nn.Module) -> Tensor | None:
    """The weight ``module`` stores (the original under a parametrization), whole (gathered
    from every rank when sharded, so that all ranks decide alike), or None when it has none
    or it is not materialized (meta)."""
    if parametrize.is_parametrized(module, "weight"):
        weight = module.parametrizations.weight.original
    else:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta:
        return None
    return (weight.full_tensor() if isinstance(weight, DTensor) else weight).detach()


def check_finite_inputs(owner: str, names: Sequence[str], statistic: Tensor, what: str) -> None:
    """Refuses calibration statistics that hold NaN or Inf, naming the layers they describe.

    Args:
        owner: the modifier's class name.
        names: the layers whose inputs ``statistic`` summarises.
        statistic: e.g. their input Hessian or per-channel norms.
        what: what ``statistic`` is, for the message (``"Hessian"``, ``"input-norm
            statistic"``).

    Raises:
        ValueError: when ``statistic`` is not finite; the message says the calibration inputs
            of those layers are.
    """
    if all_finite(statistic):
        return
    where = f"layer '{names[0]}'" if len(names) == 1 else f"layers {list(names)}"
    raise ValueError(
        f"{owner}: the {what} of {where} holds NaN or Inf: the calibration inputs are not "
        "finite (check the data and the model's dtype, e.g. float16 overflow, and the weights "
        "of the layers before it), or add the layer to ignore"
    )


def solve_on_hessian(
    owner: str,
    names: Sequence[str],
    weight: Tensor,
    statistics: HessianAccumulator,
    dampening_frac: float,
    solve: Callable[[Tensor], Result],
    workspace: HessianWorkspace | None = None,
) -> Result:
    """Runs ``solve`` on the Hessian of the layers ``names``, with errors that name them.

    The Hessian is made straight in the weight's dtype but at least float32 (each entry
    divided in the accumulation dtype, then rounded), in ``workspace`` where one is given, and
    moved to the weight's device.

    Args:
        owner: the modifier's class name.
        names: the layers sharing the Hessian (one, or several stacked into ``weight``).
        weight: their weight.
        statistics: their reduced input Hessian's accumulator.
        dampening_frac: the modifier's dampening, for the advice in errors.
        solve: the method (GPTQ, SparseGPT) given the converted Hessian, which it may change.
        workspace: where to make the Hessian; None: new memory.

    Returns:
        What ``solve`` returns.

    Raises:
        ValueError: when the Hessian holds NaN or Inf (or values too large for its dtype).
        SingularHessianError: when no dampening made it invertible.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    hessian = statistics.hessian(dtype, workspace=workspace)
    check_finite_inputs(owner, names, hessian, "Hessian")
    where = f"layer '{names[0]}'" if len(names) == 1 else f"layers {list(names)}"
    try:
        return solve(hessian.to(weight.device))
    except SingularHessianError as err:
        raise SingularHessianError(
            f"{owner}: the Hessian of {where} cannot be inverted: {err}. Set "
            f"{owner}.dampening_frac higher (it is {dampening_frac}), or add the layer to ignore"
        ) from err

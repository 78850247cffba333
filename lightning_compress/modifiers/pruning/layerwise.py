"""Steps shared by one-shot modifiers that compress each ``nn.Linear`` from its calibration inputs.

SparseGPT and Wanda (and GPTQ, which takes the same steps) hook the targeted layers at
CALIBRATION_EPOCH_START, gather statistics of their inputs, reduce them across ranks and
compress each block's layers at its SEQUENTIAL_EPOCH_END. The helpers here are the parts of
that flow that do not depend on the method: the error for a run without data, the check that
every layer saw tokens, which layers a subgraph holds, a Hessian solve whose errors name the
layer, and the attention-mask bookkeeping that keeps padded tokens out of the statistics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_sum_
from lightning_compress.modifiers.hessian import SingularHessianError
from lightning_compress.modifiers.hessian_collector import token_mask
from lightning_compress.recipe.errors import RecipeError

__all__ = [
    "InputStatistics",
    "StatisticsCollector",
    "TokenMaskTracker",
    "check_calibrated",
    "layers_inside",
    "linear_layers",
    "needs_data",
    "solve_on_hessian",
]

Result = TypeVar("Result")


class InputStatistics(Protocol):
    """What a collector holds per layer after reduction: at least the tokens it saw."""

    @property
    def num_samples(self) -> int:
        """Tokens accumulated, over all ranks."""


class StatisticsCollector(Protocol):
    """Gathers per-layer input statistics through forward pre-hooks (e.g. ``HessianCollector``)."""

    num_reads: int
    """Distinct layer inputs folded in on this rank."""

    def layer_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        """The forward pre-hook feeding layer ``name``'s input."""

    def mask_hook(self, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        """The forward pre-hook (with kwargs) recording ``module``'s attention mask."""

    def follow_input_scaling(self, layers: dict[str, nn.Module]) -> None:
        """Keeps the statistics of ``layers`` exact when smoothing rescales their inputs."""

    def reduced(self, layers: dict[str, nn.Linear]) -> Mapping[str, InputStatistics]:
        """Every layer's statistics, summed over all ranks (a collective call)."""

    def discard(self, names: Iterable[str]) -> None:
        """Frees the statistics of ``names``."""

    def clear(self) -> None:
        """Frees everything."""


class TokenMaskTracker:
    """Keeps the token mask of the latest forward of the modules taking an ``attention_mask``.

    Register :meth:`hook` (a forward pre-hook with kwargs) on the layers' ancestors that take
    an ``attention_mask`` (``hessian_collector.mask_sources``); :meth:`mask_for` then gives
    the ``[batch, seq]`` mask of real tokens for a layer input of that layout.
    """

    def __init__(self) -> None:
        self.current: Tensor | None = None

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
        """The mask of real tokens for the layer input ``x`` laid out ``[batch, seq, ...]``.

        Args:
            x: a layer input ``[..., in_features]``.

        Returns:
            A bool mask shaped ``x.shape[:-1]``, or None when no mask fits.
        """
        mask = self.current
        return mask if mask is not None and mask.shape == x.shape[:-1] else None


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
            raise RecipeError(
                f"{owner}.targets: layer '{name}' is a {type(module).__name__}; expected "
                "Linear layers (narrow targets or add the layer to ignore)"
            )
    return layers


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


def check_calibrated(owner: str, num_samples: Mapping[str, int], num_reads: int) -> None:
    """Refuses layers that saw no tokens on any rank.

    Every rank must call it with the same reduced counts (it reduces ``num_reads`` only
    when some layer is empty, which then holds on every rank).

    Args:
        owner: the modifier's class name.
        num_samples: tokens each layer saw, summed over ranks.
        num_reads: layer inputs this rank folded in.

    Raises:
        RecipeError: when no calibration batch reached the layers on any rank.
        ValueError: when only some layers saw no tokens; the message names them.
    """
    empty = [name for name, count in num_samples.items() if count == 0]
    if not empty:
        return
    reads = all_reduce_sum_(torch.tensor([num_reads]))
    if int(reads.item()) == 0:
        raise needs_data(owner, "no calibration batch reached its layers")
    raise ValueError(
        f"{owner}: layer(s) {empty} received no calibration tokens; expected every targeted "
        "layer to run on calibration data (the sequential pipeline runs only the repeated "
        "blocks, so layers outside them such as lm_head see none): add them to ignore, use "
        "pipeline='basic', or check that the attention mask keeps tokens"
    )


def solve_on_hessian(
    owner: str,
    names: Sequence[str],
    weight: Tensor,
    hessian: Tensor,
    dampening_frac: float,
    solve: Callable[[Tensor], Result],
) -> Result:
    """Runs ``solve`` on the Hessian of the layers ``names``, with errors that name them.

    The Hessian is moved to the weight's device, in the weight's dtype but at least float32.

    Args:
        owner: the modifier's class name.
        names: the layers sharing the Hessian (one, or several stacked into ``weight``).
        weight: their weight.
        hessian: their reduced input Hessian.
        dampening_frac: the modifier's dampening, for the advice in errors.
        solve: the method (GPTQ, SparseGPT) given the converted Hessian.

    Returns:
        What ``solve`` returns.

    Raises:
        ValueError: when the Hessian holds NaN or Inf.
        SingularHessianError: when no dampening made it invertible.
    """
    where = f"layer '{names[0]}'" if len(names) == 1 else f"layers {list(names)}"
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(
            f"{owner}: the Hessian of {where} holds NaN or Inf: its calibration inputs are "
            "not finite (check the data and the model's dtype, e.g. float16 overflow), or add "
            "the layer to ignore"
        )
    dtype = torch.promote_types(weight.dtype, torch.float32)
    try:
        return solve(hessian.to(device=weight.device, dtype=dtype))
    except SingularHessianError as err:
        raise SingularHessianError(
            f"{owner}: the Hessian of {where} cannot be inverted: {err}. Set "
            f"{owner}.dampening_frac higher (it is {dampening_frac}), or add the layer to ignore"
        ) from err

"""Replace every module that multiplies by weight matrices in another form with ``nn.Linear`` ones.

Algorithms (RTN, GPTQ, SparseGPT, Wanda, pruning, smoothing, QAT, export) reach weights only
through ``nn.Linear`` layers. A model whose weight matrices live elsewhere (transformers'
``Conv1D``, fused 3-D expert parameters) is made reachable by swapping those modules for
equivalent ones built from ``nn.Linear`` layers, before any modifier resolves its targets.
Each kind of module is handled by one :class:`LayerAdapter` in :data:`ADAPTERS`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from loguru import logger
from torch import nn

__all__ = ["ADAPTERS", "LayerAdapter", "Linearization", "linearize", "register_adapter"]


class LayerAdapter(abc.ABC):
    """Turns one kind of module into an equivalent module whose weight matrices are ``nn.Linear``.

    The replacement computes the same function as the module it replaces and holds the same
    weights (copied, in the same dtype and device), so a model gives the same outputs after
    the swap. An adapter may free the original's copy of the weights once the replacement is
    built (:meth:`release`), so a model never holds two copies of more than one module, and
    then puts them back from the replacement if the swap is undone (:meth:`restore`).
    """

    @abc.abstractmethod
    def claims(self, module: nn.Module) -> bool:
        """Whether this adapter replaces ``module``.

        Args:
            module: a module of the model.

        Returns:
            True if ``module`` is of the kind this adapter handles.
        """

    def check(self, module: nn.Module, name: str) -> None:  # noqa: B027 (optional hook)
        """Refuse a claimed module whose layout this adapter cannot handle.

        Called for every claimed module before anything in the model changes.

        Args:
            module: a module this adapter claims.
            name: its qualified name in the model, for the error message.

        Raises:
            ValueError: naming the module and the layout expected, when it cannot be handled.
        """

    @abc.abstractmethod
    def linearize(self, module: nn.Module) -> nn.Module:
        """Build the replacement of ``module``.

        Must not change ``module`` (:meth:`release` may, after).

        Args:
            module: a module this adapter claims (already accepted by ``check``).

        Returns:
            An equivalent module whose weight matrices are ``nn.Linear`` layers.
        """

    def release(self, module: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Free ``module``'s weights, which its replacement now holds (by default, keep them).

        Args:
            module: a module :meth:`linearize` replaced.
        """

    def restore(self, module: nn.Module, replacement: nn.Module) -> None:  # noqa: B027
        """Give ``module`` back the weights :meth:`release` freed, from ``replacement``.

        Args:
            module: the replaced module.
            replacement: what :meth:`linearize` built from it.
        """


ADAPTERS: list[LayerAdapter] = []
"""The adapters :func:`linearize` tries, in order; the first that claims a module replaces it."""


def register_adapter(adapter: LayerAdapter) -> LayerAdapter:
    """Add an adapter to :data:`ADAPTERS` (once; registering it again changes nothing).

    Args:
        adapter: the adapter.

    Returns:
        The adapter, so this can be used at module level.

    Raises:
        TypeError: if ``adapter`` is not a :class:`LayerAdapter`.
    """
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter, got {type(adapter).__name__}")
    if not any(type(known) is type(adapter) for known in ADAPTERS):
        ADAPTERS.append(adapter)
    return adapter


@dataclass
class Linearization:
    """The swaps :func:`linearize` made, so they can be undone.

    Args:
        swaps: ``(parent, child name, original, replacement, adapter)`` for each module
            replaced.
    """

    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module, LayerAdapter]] = field(
        default_factory=list
    )

    def __len__(self) -> int:
        return len(self.swaps)

    def undo(self) -> None:
        """Put every replaced module back, leaving the model as it was before the swap."""
        for parent, child, original, replacement, adapter in reversed(self.swaps):
            adapter.restore(original, replacement)
            setattr(parent, child, original)
        self.swaps.clear()


def linearize(model: nn.Module, adapters: list[LayerAdapter] | None = None) -> Linearization:
    """Swap, in place, every module an adapter claims for its ``nn.Linear``-based equivalent.

    Idempotent: replacements are not claimed again, so a second call changes nothing. Nothing
    in the model changes unless every claimed module is accepted and every replacement built.

    Args:
        model: the model to change in place.
        adapters: the adapters to use; None uses :data:`ADAPTERS`.

    Returns:
        The swaps made; ``undo()`` puts the original modules back.

    Raises:
        ValueError: before anything changes, if an adapter refuses a claimed module's layout, or
            a stack of weight matrices (a parameter of three or more dimensions, the last two
            larger than one) sits in a repeated block (a child of an ``nn.ModuleList``), in a
            module that no adapter claims and that is not a convolution.
    """
    adapters = ADAPTERS if adapters is None else adapters
    claimed = _claimed_modules(model, adapters)
    for name, (_, module) in claimed.items():
        claimed[name][0].check(module, name)
    _refuse_unknown_fused(model, claimed)

    built = _build(claimed)
    result = Linearization()
    for name, adapter, original, replacement in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, replacement)
        result.swaps.append((parent, child, original, replacement, adapter))
        logger.debug(
            "Replaced {} ({}) by {}", name, type(original).__name__, type(replacement).__name__
        )
    if result.swaps:
        logger.info(
            "Made {} module(s) of {} reachable as nn.Linear layers",
            len(result.swaps),
            type(model).__name__,
        )
    return result


def _build(
    claimed: dict[str, tuple[LayerAdapter, nn.Module]],
) -> list[tuple[str, LayerAdapter, nn.Module, nn.Module]]:
    """Each claimed module's replacement, the original released as soon as it is built; if a
    build fails, the released ones are restored before the error propagates."""
    built: list[tuple[str, LayerAdapter, nn.Module, nn.Module]] = []
    try:
        for name, (adapter, module) in claimed.items():
            replacement = adapter.linearize(module)
            adapter.release(module)
            built.append((name, adapter, module, replacement))
    except BaseException:
        for _, adapter, module, replacement in reversed(built):
            adapter.restore(module, replacement)
        raise
    return built


def _claimed_modules(
    model: nn.Module, adapters: list[LayerAdapter]
) -> dict[str, tuple[LayerAdapter, nn.Module]]:
    """The outermost modules some adapter claims, by qualified name."""
    claimed: dict[str, tuple[LayerAdapter, nn.Module]] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in claimed):
            continue
        adapter = next((a for a in adapters if a.claims(module)), None)
        if adapter is not None:
            claimed[name] = (adapter, module)
    return claimed


def _refuse_unknown_fused(
    model: nn.Module, claimed: dict[str, tuple[LayerAdapter, nn.Module]]
) -> None:
    """Raise for a stack of weight matrices (a parameter of three or more dimensions, the last
    two larger than one) inside a repeated block (a child of an ``nn.ModuleList``) in a module
    no adapter claims. Convolutions, and parameters outside the blocks (a vision tower's
    position embeddings), are not weight matrices of the decoder and are left alone."""
    blocks = [
        f"{name}." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
    ]
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or any(
            module_name == outer or module_name.startswith(f"{outer}.") for outer in claimed
        ):
            continue
        if not any(module_name.startswith(prefix) for prefix in blocks):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 3 and min(param.shape[-2:]) > 1:
                full = f"{module_name}.{param_name}" if module_name else param_name
                raise ValueError(
                    f"{type(model).__name__} holds {full} with shape {tuple(param.shape)} in "
                    f"{type(module).__name__}, a fused weight layout no layer adapter "
                    "understands; expected weight matrices in nn.Linear layers, transformers' "
                    "Conv1D or fused experts (gate_up_proj/up_proj and down_proj)"
                )

"""Finding the layers a recipe targets: by class name, module name or ``re:`` regex."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ModelParameterizedLayer",
    "get_layers_params",
    "is_router",
    "match_named_modules",
    "module_class_names",
    "module_matches",
    "normalize_targets",
]

REGEX_PREFIX = "re:"
ROUTER_LAYER_NAMES = ("shared_expert_gate",)
"""Names of ``nn.Linear`` layers that route tokens in mixtures of experts (Qwen2/3.5-MoE)."""


@dataclass
class ModelParameterizedLayer:
    """A parameter together with the layer that owns it.

    Args:
        layer_name: the layer's name in the model.
        layer: the layer.
        param_name: the parameter's name in the layer (e.g. ``weight``).
        param: the parameter.
    """

    layer_name: str
    layer: Any
    param_name: str
    param: Any


def normalize_targets(targets: str | Iterable[str] | None) -> list[str]:
    """Turn a target or list of targets into a list of strings.

    Args:
        targets: one target, several, or None.

    Returns:
        The targets as a list (empty for None).
    """
    if targets is None:
        return []
    if isinstance(targets, str):
        return [targets]
    return list(targets)


def module_matches(name: str, module: nn.Module, target: str) -> bool:
    """Whether one module is selected by one target.

    Args:
        name: the module's name in the model.
        module: the module.
        target: a class name (``Linear``), a module name (``lm_head``) or ``re:<regex>``
            matched from the start of the module name. A module name also selects the
            module of that name inside a wrapper (``lm_head`` selects ``model.lm_head`` of a
            LightningModule holding the transformers model as ``model``). A class name
            selects the module's class and every ``nn.Module`` class it derives from, as
            compressed-tensors matches: ``Linear`` selects Falcon's ``FalconLinear``; it
            never selects a router (:func:`is_router`), which only its name or a regex
            selects.

    Returns:
        True if the target selects the module.
    """
    if target.startswith(REGEX_PREFIX):
        return re.match(target[len(REGEX_PREFIX) :], name) is not None
    if target == name or name.endswith("." + target):
        return True
    return not is_router(name, module) and target in module_class_names(module)


def is_router(name: str, module: nn.Module) -> bool:
    """Whether ``module`` routes tokens to a mixture's experts.

    Routers are kept in full precision unless a target names them (their module name or a
    regex): a class-name target such as ``Linear`` passes them over, also when the router
    is an ``nn.Linear`` (Llama 4's ``Llama4Router``, the
    ``shared_expert_gate`` of Qwen2-MoE).

    Args:
        name: the module's name in the model.
        module: the module.

    Returns:
        True for a module whose class name contains ``Router`` (transformers' ``TopKRouter``
        classes) or a layer named like a shared expert's gate.
    """
    return "router" in type(module).__name__.lower() or name.rsplit(".", 1)[-1] in (
        ROUTER_LAYER_NAMES
    )


def module_class_names(module: nn.Module) -> list[str]:
    """The names a class-name target may use to select ``module``.

    Args:
        module: the module.

    Returns:
        The names of its class and of every ``nn.Module`` class it derives from, most
        derived first.
    """
    return [cls.__name__ for cls in type(module).__mro__ if issubclass(cls, nn.Module)]


def match_named_modules(
    model: nn.Module,
    targets: str | Iterable[str],
    ignore: str | Iterable[str] | None = None,
    require_all: bool = True,
) -> dict[str, nn.Module]:
    """The named modules of ``model`` selected by ``targets`` and not by ``ignore``.

    Args:
        model: the model to search.
        targets: class names, module names or ``re:`` regexes.
        ignore: the same kinds of patterns, removed from the selection.
        require_all: raise when any single target selects nothing.

    Returns:
        The selected modules by name, in the model's order.

    Raises:
        ValueError: if a target is malformed, or selects no module (every target when
            ``require_all``, else all of them together).
    """
    target_list = normalize_targets(targets)
    ignore_list = normalize_targets(ignore)
    for pattern in target_list + ignore_list:
        _check_pattern(pattern)
    named = [(name, module) for name, module in model.named_modules() if name]
    unmatched = [t for t in target_list if not any(module_matches(n, m, t) for n, m in named)]
    if not target_list or (require_all and unmatched) or len(unmatched) == len(target_list):
        raise ValueError(
            f"targets {unmatched or target_list} match no module of {type(model).__name__}; "
            f"expected class names (e.g. {_example_classes(model)}), module names "
            f"(e.g. {_example_names(named)}) or 're:<regex>' over module names"
        )
    return {
        name: module
        for name, module in named
        if any(module_matches(name, module, t) for t in target_list)
        and not any(module_matches(name, module, i) for i in ignore_list)
    }


def get_layers_params(
    targets: str | Iterable[str],
    module: nn.Module,
    param_name: str = "weight",
    ignore: str | Iterable[str] | None = None,
) -> dict[str, ModelParameterizedLayer]:
    """The ``param_name`` parameter of every targeted layer.

    Args:
        targets: class names, module names or ``re:`` regexes.
        module: the model to search.
        param_name: the parameter to collect from each layer.
        ignore: patterns to leave out.

    Returns:
        ``ModelParameterizedLayer`` entries keyed by ``"{layer_name}.{param_name}"``.

    Raises:
        ValueError: if nothing matches, or a matched layer has no such parameter.
    """
    layers = match_named_modules(module, targets, ignore)
    result = {}
    for name, layer in layers.items():
        param = getattr(layer, param_name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(
                f"target layer '{name}' ({type(layer).__name__}) has no parameter "
                f"'{param_name}'; target layers that hold weights, such as Linear"
            )
        result[f"{name}.{param_name}"] = ModelParameterizedLayer(name, layer, param_name, param)
    return result


def _check_pattern(pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"targets/ignore: expected non-empty strings, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as err:
            raise ValueError(f"targets/ignore: invalid regex {pattern!r}: {err}") from err


def _example_classes(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            seen.setdefault(type(module).__name__)
    return list(seen)[:4]


def _example_names(named: list[tuple[str, nn.Module]]) -> list[str]:
    return [name for name, _ in named][:3]

"""Which weights of the decoder blocks a recipe compresses, ignores on purpose, or leaves out.

What counts: every parameter of two or more dimensions inside the model's decoder blocks (the
blocks the sequential pipeline walks, :func:`find_blocks`; the whole model when it has none),
once each (a tied weight counts once), a parametrized weight under its own name. These are
the weight matrices (and any fused higher-dimensional weight). Vectors and scalars (norm
weights, biases, scales, attention sinks) are not weights to compress and are not counted.

Each counted weight is *compressed* (the run left it quantized or pruned), *ignored* (its
layer matches an ``ignore`` pattern of the recipe), a *router* of a mixture of experts (kept
in full precision unless a target names it; ``core.model_layer.is_router``) or *left out*: a
weight the recipe did not reach that no ``ignore`` names — a layer type no layer adapter turns
into an ``nn.Linear``, a ``Linear`` no target matches, or (after a run) a targeted layer left
unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger
from torch import nn
from torch.nn.utils import parametrize

from lightning_compress.core.model_layer import is_router, module_matches
from lightning_compress.core.shard_counts import zero_count
from lightning_compress.layers import linearize
from lightning_compress.pipelines.blocks import find_blocks
from lightning_compress.recipe import RecipeError

__all__ = [
    "WeightCoverage",
    "check_coverage",
    "coverage_checked",
    "ignore_patterns",
    "recipe_coverage",
    "targeted_layers",
    "weight_coverage",
]

SHOWN_NAMES = 8
"""Left-out weights are named in at most this many compacted names per reason."""
NOT_A_LINEAR = "{} (no layer adapter makes it an nn.Linear)"
NOT_TARGETED = "Linear layers no target matches"
UNCHANGED = "targeted, but left unchanged by the run"
SPARSE_DENSE = "pruned under 50% (saved dense)"


@dataclass(frozen=True)
class CountedWeight:
    """One weight tensor counted by the coverage.

    Args:
        layer: the name of the module that holds it.
        module: that module.
        attribute: its attribute name there (``"weight"``).
        elements: its number of elements.
    """

    layer: str
    module: nn.Module
    attribute: str
    elements: int


@dataclass
class WeightCoverage:
    """The weights of a model's decoder blocks: compressed, ignored on purpose, left out.

    Args:
        scope: what was counted, e.g. ``"decoder blocks model.layers.0-27"``.
        elements: each counted weight's name to its number of elements.
        compressed: compressed weights to how (a scheme's label, ``"2:4 sparse"``, ...).
        ignored: weights whose layer an ``ignore`` pattern names.
        routers: weights of routers no target named, kept in full precision by design.
        left_out: the other weights, to why they were not compressed.
    """

    scope: str
    elements: dict[str, int] = field(default_factory=dict)
    compressed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def total_elements(self) -> int:
        """The elements of every counted weight."""
        return sum(self.elements.values())

    def elements_of(self, names: Iterable[str]) -> int:
        """The elements of the weights ``names``.

        Args:
            names: counted weight names.

        Returns:
            Their number of elements.
        """
        return sum(self.elements[name] for name in names)

    @property
    def compressed_fraction(self) -> float:
        """The share of the counted elements that is compressed (1.0 when nothing is counted)."""
        total = self.total_elements
        return self.elements_of(self.compressed) / total if total else 1.0

    def format(self) -> str:
        """One line: tensors and elements compressed (per label), ignored and left out."""
        labels = Counter(self.compressed.values())
        per_label = "; ".join(f"{label}: {count}" for label, count in labels.items())
        parts = [
            f"{self.scope}: {len(self.compressed)} of {len(self.elements)} weight tensors "
            f"compressed ({self.compressed_fraction:.1%} of {self.total_elements:,} elements"
            + (f"; {per_label}" if per_label else "")
            + ")",
            f"{len(self.ignored)} ignored ({self._share(self.ignored)})",
            *([f"{len(self.routers)} routers kept"] if self.routers else []),
            f"{len(self.left_out)} left out ({self._share(self.left_out)})",
        ]
        return ", ".join(parts)

    def describe_left_out(self) -> str:
        """The left-out weights by reason, their names compacted: indices as ``*``, a count."""
        by_reason: dict[str, Counter[str]] = {}
        for name, reason in self.left_out.items():
            by_reason.setdefault(reason, Counter())[re.sub(r"\.\d+(?=\.|$)", ".*", name)] += 1
        parts = []
        for reason, patterns in by_reason.items():
            names = [f"{name} x{count}" if count > 1 else name for name, count in patterns.items()]
            if len(names) > SHOWN_NAMES:
                names = [*names[:SHOWN_NAMES], f"... {len(names) - SHOWN_NAMES} more"]
            parts.append(f"{reason}: {', '.join(names)}")
        return "; ".join(parts)

    def warn(self) -> None:
        """Logs a WARNING listing the left-out weights; nothing when none is left out."""
        if self.left_out:
            logger.opt(depth=1).warning(
                "{} weight tensors of the {} ({}) were left out, neither compressed nor "
                "named by an ignore pattern: {}. Target them or add them to ignore; strict=True "
                "(--strict on the command line) refuses such a recipe before it changes the model",
                len(self.left_out),
                self.scope,
                self._share(self.left_out),
                self.describe_left_out(),
            )

    def metrics(self) -> dict[str, float]:
        """Numbers for a metrics logger: tensors per category and the compressed share."""
        return {
            "compressed_tensors": float(len(self.compressed)),
            "ignored_tensors": float(len(self.ignored)),
            "router_tensors": float(len(self.routers)),
            "left_out_tensors": float(len(self.left_out)),
            "compressed_elements_fraction": self.compressed_fraction,
        }

    def _share(self, names: Iterable[str]) -> str:
        total = self.total_elements
        return f"{self.elements_of(names) / total:.1%} of elements" if total else "no elements"


def counted_weights(
    model: nn.Module, sequential_targets: Sequence[str] | None = None
) -> tuple[str, dict[str, CountedWeight]]:
    """The weights the coverage counts (see the module docstring), by qualified name.

    Args:
        model: the model.
        sequential_targets: class names of the blocks, as the sequential pipeline takes them.

    Returns:
        A description of the scope, and the counted weights in model order.
    """
    blocks = find_blocks(model, sequential_targets)
    scope = _scope(blocks)
    roots = blocks or [("", model)]
    weights: dict[str, CountedWeight] = {}
    seen: set[int] = set()
    for root_name, root in roots:
        for name, module in root.named_modules(prefix=root_name):
            if isinstance(module, parametrize.ParametrizationList):
                continue
            for attribute, tensor in _own_weights(module):
                if tensor.dim() < 2 or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                full = f"{name}.{attribute}" if name else attribute
                weights[full] = CountedWeight(name, module, attribute, tensor.numel())
    return scope, weights


def weight_coverage(
    model: nn.Module,
    compressed_layers: Mapping[str, str],
    ignore: Iterable[str] = (),
    targeted: Iterable[str] = (),
    sequential_targets: Sequence[str] | None = None,
) -> WeightCoverage:
    """The coverage of ``model`` as it is: which counted weights are compressed.

    Args:
        model: the model, after compression.
        compressed_layers: the names of the layers whose weight is compressed, to how (a
            scheme's label, ``"2:4 sparse"``, ...).
        ignore: the recipe's ``ignore`` patterns.
        targeted: the names of the layers the recipe targeted for compression: a targeted
            weight not in ``compressed_layers`` counts as pruned when it holds zeros (too
            few for the checkpoint to store it sparse), else as left unchanged.
        sequential_targets: class names of the blocks.

    Returns:
        The coverage.
    """
    scope, weights = counted_weights(model, sequential_targets)
    ignore, targeted = list(ignore), set(targeted)
    coverage = WeightCoverage(scope, {name: item.elements for name, item in weights.items()})
    for name, item in weights.items():
        if item.attribute == "weight" and item.layer in compressed_layers:
            coverage.compressed[name] = compressed_layers[item.layer]
        elif any(module_matches(item.layer, item.module, pattern) for pattern in ignore):
            coverage.ignored.append(name)
        elif is_router(item.layer, item.module) and item.layer not in targeted:
            coverage.routers.append(name)
        elif item.attribute == "weight" and item.layer in targeted:
            if _holds_zeros(getattr(item.module, item.attribute)):
                coverage.compressed[name] = SPARSE_DENSE
            else:
                coverage.left_out[name] = UNCHANGED
        else:
            coverage.left_out[name] = _reason(item)
    return coverage


def targeted_layers(model: nn.Module, modifiers: Sequence[Any]) -> dict[str, str]:
    """The layers whose weights ``modifiers`` compress, found without changing ``model``.

    Args:
        model: the model.
        modifiers: the recipe's modifiers (each answers ``compression_targets``).

    Returns:
        Each layer's name to the class name of the first modifier that compresses it.

    Raises:
        RecipeError: when a modifier refuses its targets or ``ignore`` patterns.
    """
    targeted: dict[str, str] = {}
    for modifier in modifiers:
        for name in modifier.compression_targets(model):
            targeted.setdefault(name, type(modifier).__name__)
    return targeted


def recipe_coverage(
    model: nn.Module, modifiers: Sequence[Any], sequential_targets: Sequence[str] | None = None
) -> WeightCoverage:
    """The coverage ``modifiers`` would reach, found before any of them changes ``model``.

    Args:
        model: the model, before compression (its layers already linearized).
        modifiers: the recipe's modifiers.
        sequential_targets: class names of the blocks.

    Returns:
        The coverage the recipe would give; a targeted weight is labelled with the class
        name of the modifier that compresses it.

    Raises:
        RecipeError: when a modifier refuses its targets or ``ignore`` patterns.
    """
    targeted = targeted_layers(model, modifiers)
    return weight_coverage(
        model, targeted, ignore_patterns(modifiers), sequential_targets=sequential_targets
    )


def check_coverage(
    model: nn.Module,
    modifiers: Sequence[Any],
    model_name: str,
    sequential_targets: Sequence[str] | None = None,
) -> WeightCoverage:
    """Refuse a recipe that would leave a weight of the decoder blocks out (``strict=True``).

    An ``ignore`` pattern of any modifier that matches nothing is an error too. Nothing in
    ``model`` or in the modifiers' settings changes.

    Args:
        model: the model, before compression.
        modifiers: the recipe's modifiers.
        model_name: how the error names the model (its class).
        sequential_targets: class names of the blocks.

    Returns:
        The coverage the recipe will give (nothing left out).

    Raises:
        RecipeError: naming the left-out weights, or a modifier's refused pattern.
    """
    for modifier in modifiers:
        modifier.check_ignore(model, strict=True)
    coverage = recipe_coverage(model, modifiers, sequential_targets)
    if coverage.left_out:
        raise RecipeError(
            f"strict: the recipe leaves {len(coverage.left_out)} weight tensors of the "
            f"{coverage.scope} of {model_name} out, neither compressed nor named by an "
            f"ignore pattern: {coverage.describe_left_out()}; expected every weight targeted "
            "or ignored (add them to a modifier's targets or ignore)"
        )
    return coverage


def ignore_patterns(modifiers: Sequence[Any]) -> list[str]:
    """The ``ignore`` patterns of every modifier of a recipe.

    Args:
        modifiers: the recipe's modifiers.

    Returns:
        Their patterns, in order.
    """
    return [pattern for modifier in modifiers for pattern in modifier.ignore]


@contextmanager
def coverage_checked(
    model: nn.Module,
    modifiers: Sequence[Any],
    strict: bool,
    sequential_targets: Sequence[str] | None = None,
) -> Iterator[None]:
    """With ``strict``, refuse a recipe that leaves a weight out, before the body runs.

    Wrap the session's ``initialize`` in it. The model's layers are linearized first (as
    ``initialize`` does; see :func:`~lightning_compress.layers.linearize`) so that the check
    sees the layers the modifiers will see; if the check or the body fails, that swap is
    undone and the model is as it was. Without ``strict`` only the body runs.

    Args:
        model: the model, before compression.
        modifiers: the recipe's modifiers.
        strict: whether to check.
        sequential_targets: class names of the blocks.

    Raises:
        RecipeError: from :func:`check_coverage`.
    """
    if not strict:
        yield
        return
    swapped = linearize(model)
    try:
        check_coverage(model, modifiers, type(model).__name__, sequential_targets)
        yield
    except BaseException:
        swapped.undo()
        raise


def _holds_zeros(weight: torch.Tensor) -> bool:
    return zero_count(weight) > 0  # over all shards of a DTensor: every rank calls it


def _own_weights(module: nn.Module) -> list[tuple[str, Any]]:
    """The module's own parameters, a parametrized one under its attribute name."""
    tensors = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        tensors += [(name, item.original) for name, item in module.parametrizations.items()]
    return tensors


def _reason(item: CountedWeight) -> str:
    if isinstance(item.module, nn.Linear):
        return NOT_TARGETED
    return NOT_A_LINEAR.format(type(item.module).__name__)


def _scope(blocks: list[tuple[str, nn.Module]]) -> str:
    if not blocks:
        return "model (it has no repeated blocks)"
    if len(blocks) == 1:
        return f"decoder block {blocks[0][0]}"
    return f"decoder blocks {blocks[0][0]} to {blocks[-1][0]}"

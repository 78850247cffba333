"""Which layers smoothing pairs, found from the block's structure and its calibration data.

A mapping joins a *smooth layer* to the *balance layers* that read its output channels (see
:mod:`~lightning_compress.modifiers.smoothing.folding`). No table of architectures or names is
used. Inside each block (decoder layer):

* **norm → linears**: the linear layers whose input is the tensor a normalization layer
  returned (LayerNorm, RMSNorm of any library, with or without bias), a view of it, or rows
  gathered from it (a mixture's experts, each reading the tokens routed to it; experts that
  no token of the probe reached are taken with their siblings). Every other module reading
  it through a weight matrix (a router, a shared expert's gate, an ignored linear layer)
  rides along as a *passenger*: rescaled so the function and the routing do not change, not
  compressed;
* **linear → linears**: a linear layer P and the later linear layers N with as many input
  channels as P has outputs, which :meth:`~lightning_compress.modifiers.smoothing.probe.
  BlockProbe.reached` shows to receive P's channels linearly, channel for channel: ``v_proj →
  o_proj`` in multi-head attention without grouped keys and values, ``up_proj → down_proj`` in
  gated MLPs; ``gate_proj → down_proj`` (through SiLU), ``fc1 → fc2`` (through ReLU) and
  grouped-query ``v_proj → o_proj`` (other widths) are not.

Every mapping found must then leave the block's output unchanged when applied
(:meth:`~lightning_compress.modifiers.smoothing.probe.BlockProbe.preserves_output`). One that
does not is dropped when its smooth layer cannot carry a scale (a norm computing ``x * (1 +
w)``), a balance layer's weight is tied to another module, or it joins two linear layers; a
norm whose scale reaches its readers but whose readers were not all found is an error naming
the norm and the readers found: half of a norm's readers are never smoothed.

Mappings may also be given, as in llm-compressor: ``[[balance patterns], smooth pattern]`` or
``{balance_layers: [...], smooth_layer: ...}``, patterns being module names or ``re:`` regexes.
Balance patterns may match passengers (a router); passengers reading a given smooth
normalization layer that the patterns leave out are added, as above, so the reference
project's MoE recipes (``post_attention_layernorm → experts.*.gate_proj, experts.*.up_proj``)
keep the routing. They are checked against the model when the modifier is initialized and
with the same probes on each block's calibration data before any weight changes; a mapping
that is not exact is an error naming the layer.

Under several processes each probe's verdict is the agreement of all ranks, so every rank
finds the same mappings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from loguru import logger
from torch import nn

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_min_
from lightning_compress.core.model_layer import module_matches
from lightning_compress.core.tensors import same_input
from lightning_compress.modifiers.smoothing.folding import (
    SmoothingMapping,
    has_weight_matrix,
    is_linear,
    is_norm,
    linear_weight,
    output_width,
)
from lightning_compress.modifiers.smoothing.probe import PROBE_FACTOR, Baseline, BlockProbe
from lightning_compress.recipe.errors import RecipeError

__all__ = [
    "MappingSpec",
    "check_mappings",
    "check_specs",
    "find_mappings",
    "parse_mappings",
    "resolve_mappings",
]


@dataclass(frozen=True)
class MappingSpec:
    """A mapping as a recipe gives it.

    Args:
        balance: patterns of the balance layers.
        smooth: pattern of the smooth layer.
    """

    balance: tuple[str, ...]
    smooth: str


def parse_mappings(owner: str, raw: list[Any] | None) -> list[MappingSpec]:
    """Reads the ``mappings`` setting.

    Args:
        owner: the modifier's class name, for messages.
        raw: ``[[balance patterns], smooth pattern]`` or ``{balance_layers, smooth_layer}``
            entries, or None.

    Returns:
        The specs (empty for None).

    Raises:
        RecipeError: for an entry of another shape; the message names it.
    """
    specs = []
    for index, entry in enumerate(raw or []):
        if isinstance(entry, dict) and set(entry) == {"balance_layers", "smooth_layer"}:
            balance, smooth = entry["balance_layers"], entry["smooth_layer"]
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            balance, smooth = entry
        else:
            balance = smooth = None
        balance = [balance] if isinstance(balance, str) else balance
        if not (
            isinstance(smooth, str)
            and isinstance(balance, (list, tuple))
            and balance
            and all(isinstance(pattern, str) for pattern in balance)
        ):
            raise RecipeError(
                f"{owner}.mappings[{index}]: expected [[balance layer patterns], smooth layer "
                f"pattern] or {{balance_layers: [...], smooth_layer: ...}}, got {entry!r}"
            )
        specs.append(MappingSpec(tuple(balance), smooth))
    return specs


def check_specs(
    owner: str,
    specs: Sequence[MappingSpec],
    model: nn.Module,
    linears: dict[str, nn.Module],
    ignore: Sequence[str],
) -> None:
    """Checks given mappings against the model's structure, before anything runs.

    Args:
        owner: the modifier's class name, for messages.
        specs: the mappings.
        model: the model.
        linears: the targeted linear layers (not ignored), by name.
        ignore: the modifier's ignore patterns.

    Raises:
        RecipeError: when a pattern matches nothing, a smooth layer is neither a normalization
            nor a linear layer or is ignored, or a balance layer is neither a targeted linear
            nor a passenger (a module such as a router reading through a weight matrix).
    """
    modules = dict(model.named_modules())
    for index, spec in enumerate(specs):
        where = f"{owner}.mappings[{index}]"
        for pattern in (spec.smooth, *spec.balance):
            if not _matching(modules, [pattern]):
                raise RecipeError(f"{where}: {pattern!r} matches no module of the model")
        for name, module in _matching(modules, [spec.smooth]).items():
            if not (is_norm(module) or is_linear(module)):
                raise RecipeError(
                    f"{where}: smooth layer '{name}' is a {type(module).__name__}; expected a "
                    "normalization layer (a per-channel weight) or a Linear layer, whose output "
                    "channels can be divided by a scale"
                )
            if any(module_matches(name, module, pattern) for pattern in ignore):
                raise RecipeError(f"{where}: smooth layer '{name}' is in ignore")
        for name, module in _matching(modules, spec.balance).items():
            if name not in linears and (is_linear(module) or not has_weight_matrix(module)):
                what = "in ignore or not in targets" if is_linear(module) else "not linear"
                raise RecipeError(
                    f"{where}: balance layer '{name}' ({type(module).__name__}) is {what}; "
                    "expected targeted Linear layers, whose input columns can take a scale"
                )


def resolve_mappings(
    owner: str,
    specs: Sequence[MappingSpec],
    block_name: str,
    modules: dict[str, nn.Module],
    linears: dict[str, nn.Module],
) -> list[SmoothingMapping]:
    """The given mappings inside one block.

    Each smooth layer a pattern matches pairs with the balance layers matched inside its
    nearest enclosing module that holds any (as the reference project resolves them): a
    block-level norm with the block's layers, ``experts.3.up_proj`` with
    ``experts.3.down_proj``.

    Args:
        owner: the modifier's class name, for messages.
        specs: the mappings (checked by :func:`check_specs`).
        block_name: the block's name, for messages.
        modules: the block's modules, by their names in the model.
        linears: the targeted linear layers; other balance layers matched are passengers.

    Returns:
        One mapping per smooth layer matched inside the block, in the order of the specs.

    Raises:
        RecipeError: when no balance layer goes with a smooth layer, one goes with two smooth
            layers of a spec, or the widths differ.
    """
    mappings = []
    for index, spec in enumerate(specs):
        where = f"{owner}.mappings[{index}]"
        matched = _matching(modules, spec.balance)
        owners: dict[str, str] = {}
        for smooth_name, smooth_layer in _matching(modules, [spec.smooth]).items():
            balances = _nearest(smooth_name, matched)
            if not balances:
                raise RecipeError(
                    f"{where}: {list(spec.balance)} match no layer of block '{block_name}', "
                    f"where the smooth layer is '{smooth_name}'"
                )
            width = output_width(smooth_layer)
            for name, layer in balances.items():
                if name in owners:
                    raise RecipeError(
                        f"{where}: balance layer '{name}' goes with both '{owners[name]}' and "
                        f"'{smooth_name}'; expected each balance layer to read one smooth layer"
                    )
                owners[name] = smooth_name
                if _input_width(layer) != width:
                    raise RecipeError(
                        f"{where}: balance layer '{name}' has {_input_width(layer)} input "
                        f"channels but smooth layer '{smooth_name}' has {width} output channels"
                    )
            mappings.append(_mapping(smooth_name, smooth_layer, balances, linears))
    return mappings


def _nearest(smooth_name: str, matched: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers of ``matched`` inside the nearest module enclosing ``smooth_name`` that holds
    any of them."""
    parts = smooth_name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:end])
        inside = {
            name: layer
            for name, layer in matched.items()
            if name != smooth_name and (not prefix or name.startswith(f"{prefix}."))
        }
        if inside:
            return inside
    return {}


def find_mappings(
    owner: str,
    probe: BlockProbe,
    linears: dict[str, nn.Module],
    norms: dict[str, nn.Module],
    others: dict[str, nn.Module],
    block_name: str,
) -> list[SmoothingMapping]:
    """Finds the mappings of one block (see the module docstring).

    Args:
        owner: the modifier's class name, for messages.
        probe: the block and one of its calibration calls.
        linears: the targeted linear layers inside the block, by name.
        norms: the normalization layers inside the block (not ignored), by name.
        others: the block's other modules that may read through a weight matrix (routers,
            ignored linear layers), by name: passengers where they read a norm's output.
        block_name: the block's name, for messages.

    Returns:
        The exact mappings, in the order their balance layers run.

    Raises:
        RecipeError: for a norm whose readers were not all found (see the module docstring).
    """
    names = {module: name for name, module in {**others, **linears, **norms}.items()}
    watched = {**others, **linears}
    baseline = probe.baseline(watched.values(), norms.values())
    readers_of = _agreed_readers(baseline, watched)
    found: dict[nn.Module, list[nn.Module]] = {}
    for norm, readers in readers_of.items():
        if any(reader in linears.values() for reader in readers):
            found[norm] = readers
    claimed = {reader for readers in found.values() for reader in readers}
    order = _ran_everywhere(baseline, linears)
    probed: set[tuple[str, ...]] = set()
    for index, producer in enumerate(order):
        family = _family(names[producer])
        if family in probed:
            continue  # a sibling (the same layer of another expert) answered for it
        probed.add(family)
        candidates = [
            reader
            for reader in order[index + 1 :]
            if reader not in claimed
            and linear_weight(reader).shape[1] == output_width(producer)
            and not same_input(baseline.inputs[reader], baseline.inputs[producer])
        ]
        if candidates:
            verdicts = _agreed(probe.reached(producer, candidates, baseline))
            reached = [reader for reader, ok in zip(candidates, verdicts, strict=True) if ok]
            if reached:
                for smooth, readers in _analogues(producer, reached, linears, names).items():
                    if smooth not in found and not claimed.intersection(readers):
                        found[smooth] = readers
                        claimed.update(readers)
    position: dict[nn.Module, int] = {}
    for layer in [*order, *watched.values()]:  # run order, then module order for idle ones
        position.setdefault(layer, len(position))

    def first(readers: list[nn.Module]) -> int:
        return min(position[reader] for reader in readers)

    mappings = [
        _mapping(
            names[smooth], smooth, {names[r]: r for r in sorted(readers, key=position.get)}, linears
        )
        for smooth, readers in sorted(found.items(), key=lambda item: first(item[1]))
    ]
    return _exact(owner, probe, mappings, baseline, block_name)


def check_mappings(
    owner: str,
    probe: BlockProbe,
    mappings: Sequence[SmoothingMapping],
    linears: dict[str, nn.Module],
    others: dict[str, nn.Module],
    names: dict[nn.Module, str],
    block_name: str,
) -> list[SmoothingMapping]:
    """Checks given mappings on a block's calibration data, before any weight changes, and adds
    the passengers of each smooth normalization layer that the patterns left out.

    Args:
        owner: the modifier's class name, for messages.
        probe: the block and one of its calibration calls.
        mappings: the block's mappings (from :func:`resolve_mappings`).
        linears: the targeted linear layers inside the block, by name (watched, so an error
            can name the readers a mapping leaves out).
        others: the block's modules that may read through a weight matrix and are not
            targeted (routers, ignored linear layers), by name.
        names: the model's modules' names, for messages.
        block_name: the block's name, for messages.

    Returns:
        The mappings, with their passengers.

    Raises:
        RecipeError: naming the balance layer that does not receive the smooth layer's output
            channels linearly, or the mapping whose smoothing changes the block's output.
    """
    balances = [layer for mapping in mappings for layer in mapping.balances]
    smooth_norms = [mapping.smooth for mapping in mappings if is_norm(mapping.smooth)]
    watched = {names[layer]: layer for layer in [*balances, *linears.values(), *others.values()]}
    baseline = probe.baseline(watched.values(), smooth_norms)
    readers_of = _agreed_readers(baseline, watched)
    mappings = [_with_passengers(mapping, others, readers_of) for mapping in mappings]
    ran = set(_ran_everywhere(baseline, watched))
    probed: set[tuple[tuple[str, ...], ...]] = set()
    for mapping in sorted(mappings, key=lambda m: not ran.issuperset(m.balances)):
        family = tuple(map(_family, (mapping.smooth_name, *mapping.balance_names)))
        if family in probed:
            continue  # a sibling (the same layers of another expert) answered for it
        running = {}
        for name, layer in zip(mapping.balance_names, mapping.balances, strict=True):
            if layer in ran:
                running[name] = layer
            elif not any(
                _family(other) == _family(name) and sibling in ran
                for other, sibling in linears.items()
            ):
                raise RecipeError(
                    f"{owner}.mappings: balance layer '{name}' did not run in block "
                    f"'{block_name}'; expected it to read the output of '{mapping.smooth_name}'"
                )
        probed.add(family)
        verdicts = _agreed(
            probe.reached(mapping.smooth, tuple(running.values()), baseline, mapping.passengers)
        )
        for name, ok in zip(running, verdicts, strict=True):
            if not ok:
                raise RecipeError(
                    f"{owner}.mappings: '{name}' does not receive the output channels of "
                    f"'{mapping.smooth_name}' linearly and channel for channel (on calibration "
                    f"data, multiplying a few of them by {PROBE_FACTOR:g} did not multiply just "
                    f"the same input channels of '{name}' by {PROBE_FACTOR:g}): a scale "
                    f"folded into '{mapping.smooth_name}' cannot be undone in the input "
                    f"columns of '{name}', since a non-linear function sits between them"
                )
    if _agreed([probe.preserves_output(mappings, baseline)])[0]:
        return mappings
    for mapping in mappings:
        if not _agreed([probe.preserves_output([mapping], baseline)])[0]:
            readers = readers_of.get(mapping.smooth)
            found = f" (readers found: {[names[r] for r in readers]})" if readers else ""
            raise RecipeError(
                f"{owner}.mappings: smoothing '{mapping.smooth_name}' into "
                f"{[*mapping.balance_names, *mapping.passenger_names]} changes the output of "
                f"block '{block_name}'{found}: expected every layer that reads the output of "
                f"'{mapping.smooth_name}' among the balance layers, and no weight shared with "
                "another module (tied embeddings)"
            )
    raise RecipeError(
        f"{owner}.mappings: each mapping of block '{block_name}' keeps its output, but "
        "together they change it; expected mappings that do not overlap"
    )


def _exact(
    owner: str,
    probe: BlockProbe,
    mappings: list[SmoothingMapping],
    baseline: Baseline,
    block_name: str,
) -> list[SmoothingMapping]:
    """The mappings whose smoothing leaves the block's output unchanged.

    Raises:
        RecipeError: for a norm that carries a scale, has no tied balance layer, and whose
            mapping is not exact: some of its readers were not found.
    """
    if not mappings or _agreed([probe.preserves_output(mappings, baseline)])[0]:
        return mappings
    verdicts = _agreed([probe.preserves_output([mapping], baseline) for mapping in mappings])
    for mapping, ok in zip(mappings, verdicts, strict=True):
        if ok:
            continue
        if (
            is_norm(mapping.smooth)
            and not _tied(probe.block, mapping.balances)
            and _agreed([probe.scales_exactly(mapping.smooth, baseline)])[0]
        ):
            raise RecipeError(
                f"{owner}: smoothing '{mapping.smooth_name}' into the readers found, "
                f"{[*mapping.balance_names, *mapping.passenger_names]}, changes the output of "
                f"block '{block_name}': another module reads its output in a way the probes "
                "cannot follow; give mappings naming every reader, or add "
                f"'{mapping.smooth_name}' to ignore"
            )
        logger.info(
            "not smoothing {} into {}: that changes the block's output (its weight does not "
            "scale its output, or a weight is shared)",
            mapping.smooth_name,
            list(mapping.balance_names),
        )
    return [mapping for mapping, ok in zip(mappings, verdicts, strict=True) if ok]


def _mapping(
    smooth_name: str,
    smooth: nn.Module,
    readers: dict[str, nn.Module],
    linears: dict[str, nn.Module],
) -> SmoothingMapping:
    """A mapping whose targeted readers are balance layers and the others passengers."""
    targeted = set(linears.values())
    balances = {name: layer for name, layer in readers.items() if layer in targeted}
    passengers = {name: layer for name, layer in readers.items() if layer not in targeted}
    return SmoothingMapping(
        smooth_name,
        smooth,
        tuple(balances),
        tuple(balances.values()),
        tuple(passengers),
        tuple(passengers.values()),
    )


def _with_passengers(
    mapping: SmoothingMapping,
    others: dict[str, nn.Module],
    readers_of: dict[nn.Module, list[nn.Module]],
) -> SmoothingMapping:
    """The mapping with every passenger reading its smooth norm that it lacks."""
    readers = readers_of.get(mapping.smooth, [])
    known = {*mapping.balances, *mapping.passengers}
    added = {
        name: layer for name, layer in others.items() if layer in readers and layer not in known
    }
    if not added:
        return mapping
    logger.debug("{} also rescales {} (passengers)", mapping.smooth_name, list(added))
    return replace(
        mapping,
        passenger_names=(*mapping.passenger_names, *added),
        passengers=(*mapping.passengers, *added.values()),
    )


def _agreed_readers(
    baseline: Baseline, watched: dict[str, nn.Module]
) -> dict[nn.Module, list[nn.Module]]:
    """Each watched norm's readers, with the siblings of its readers that did not run, seen
    on any rank, in the block's module order: the same lists on every rank, though each rank
    routed other tokens to other experts."""
    result = {}
    for norm, readers in baseline.readers.items():
        readers = set(_with_idle_siblings(readers, watched, baseline))
        flags = torch.tensor([layer in readers for layer in watched.values()], dtype=torch.int64)
        agreed = all_reduce_max_(flags).tolist()
        result[norm] = [layer for layer, ok in zip(watched.values(), agreed, strict=True) if ok]
    return result


def _ran_everywhere(baseline: Baseline, linears: dict[str, nn.Module]) -> list[nn.Module]:
    """The linear layers that ran on every rank, in the order they ran (the same on all)."""
    ran = _agreed([layer in baseline.inputs for layer in linears.values()])
    everywhere = {layer for layer, ok in zip(linears.values(), ran, strict=True) if ok}
    return [layer for layer in baseline.inputs if layer in everywhere]


def _with_idle_siblings(
    readers: list[nn.Module], watched: dict[str, nn.Module], baseline: Baseline
) -> list[nn.Module]:
    """``readers`` and their siblings that did not run: the same layer of another expert
    (``experts.<i>.gate_proj``) that no token of the probe was routed to."""
    names = {module: name for name, module in watched.items()}
    families: dict[tuple[str, ...], list[nn.Module]] = {}
    for name, module in watched.items():
        families.setdefault(_family(name), []).append(module)
    result = list(readers)
    for reader in readers:
        for sibling in families.get(_family(names[reader]), []):
            if sibling not in baseline.inputs and sibling not in result:
                result.append(sibling)
    return result


def _analogues(
    producer: nn.Module,
    readers: list[nn.Module],
    linears: dict[str, nn.Module],
    names: dict[nn.Module, str],
) -> dict[nn.Module, list[nn.Module]]:
    """A linear → linear mapping found by a probe, and the same mapping in each sibling of the
    producer (``experts.<i>.up_proj → experts.<i>.down_proj`` for every ``i``): siblings are
    the same module class, so one probe answers for all; the block's output check verifies
    every sibling that ran."""
    result = {producer: readers}
    producer_name = names[producer]
    for name, sibling in linears.items():
        if sibling is producer or _family(name) != _family(producer_name):
            continue
        index = _index(name)
        twins = [linears.get(_with_index(names[reader], index)) for reader in readers]
        if all(twin is not None for twin in twins):
            result[sibling] = twins
    return result


def _index(name: str) -> str | None:
    """The last numeric part of a module name (an expert's or a block's index)."""
    return next((part for part in reversed(name.split(".")) if part.isdigit()), None)


def _with_index(name: str, index: str | None) -> str:
    """``name`` with its last numeric part replaced by ``index``."""
    parts = name.split(".")
    numeric = [position for position, part in enumerate(parts) if part.isdigit()]
    if numeric and index is not None:
        parts[numeric[-1]] = index
    return ".".join(parts)


def _family(name: str) -> tuple[str, ...]:
    """The name with its last numeric part (an expert's index) replaced by ``#``."""
    parts = name.split(".")
    numeric = [index for index, part in enumerate(parts) if part.isdigit()]
    if numeric:
        parts[numeric[-1]] = "#"
    return tuple(parts)


def _tied(block: nn.Module, layers: Iterable[nn.Module]) -> bool:
    """Whether the weight of one of ``layers`` is also another module's parameter."""
    counts: dict[int, int] = {}
    for _, parameter in block.named_parameters(remove_duplicate=False):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    return any(counts.get(id(layer.weight), 0) > 1 for layer in layers)


def _input_width(module: nn.Module) -> int:
    """The input channels of a balance layer or passenger."""
    return linear_weight(module).shape[1] if is_linear(module) else module.weight.shape[1]


def _matching(modules: dict[str, nn.Module], patterns: Sequence[str]) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in modules.items()
        if any(module_matches(name, module, pattern) for pattern in patterns)
    }


def _agreed(verdicts: list[bool]) -> list[bool]:
    """Each verdict held on every rank (unchanged on one process)."""
    if not verdicts:
        return verdicts
    return [bool(ok) for ok in all_reduce_min_(torch.tensor(verdicts, dtype=torch.int64))]

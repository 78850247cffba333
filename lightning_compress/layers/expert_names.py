"""Checkpoint names of per-expert layers: the per-expert keys transformers fuses on loading.

A linearized mixture stores its experts as ``<experts>.<e>.gate_proj`` / ``up_proj`` /
``down_proj`` layers. transformers 5 reads per-expert checkpoint keys through its conversion
mapping (``transformers.conversion_mapping``): a ``WeightConverter`` merges
``<experts>.*.<gate>.weight`` and ``<experts>.*.<up>.weight`` into ``<experts>.gate_up_proj``
(and ``<experts>.*.<down>.weight`` into ``down_proj``), after ``WeightRenaming`` s of the
module path. Those source keys are the models' original checkpoint layout, which vLLM's
loaders read too (``FusedMoE.make_expert_params_mapping`` with the same projection names).
This module derives, from the installed transformers' mapping, the checkpoint name of each
per-expert layer (Mixtral: ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``; the
Qwen-MoE family, DeepSeek-V3 and OLMoE: the in-memory names), so saving writes them and
loading reads them back.
"""

from __future__ import annotations

import re
from typing import TypeVar

from loguru import logger
from torch import nn

from lightning_compress.layers.experts import LinearExperts

__all__ = ["expert_checkpoint_names", "to_checkpoint_names", "to_model_names"]

_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
Value = TypeVar("Value")
_PLAIN = re.compile(r"^[\w\\.]+$")


def expert_checkpoint_names(model: nn.Module) -> dict[str, str]:
    """The checkpoint name of every per-expert layer whose name transformers maps.

    Args:
        model: a linearized transformers model (or one holding no experts).

    Returns:
        In-memory layer name (``model.layers.0.mlp.experts.3.gate_proj``) to checkpoint
        layer name (``model.layers.0.block_sparse_moe.experts.3.w1`` for Mixtral). Layers
        whose names are the same in both are included too. Experts of a model type whose
        transformers mapping reads no per-expert keys are left out, with a warning.
    """
    experts = {
        name: module for name, module in model.named_modules() if isinstance(module, LinearExperts)
    }
    if not experts:
        return {}
    renamings, projections = _conversion_rules(model)
    names: dict[str, str] = {}
    unmapped = []
    for path, module in experts.items():
        stored = _checkpoint_path(path, renamings)
        if stored is None or not projections:
            unmapped.append(path)
            continue
        for index, _ in enumerate(module.experts()):
            for layer, checkpoint_layer in projections.items():
                names[f"{path}.{index}.{layer}"] = f"{stored}.{index}.{checkpoint_layer}"
    if unmapped:
        logger.warning(
            "transformers' conversion mapping for {} reads no per-expert keys of {}: they are "
            "saved under their in-memory names, which load_compressed reads and "
            "transformers' from_pretrained does not",
            type(model).__name__,
            ", ".join(unmapped),
        )
    return names


def to_checkpoint_names(model: nn.Module, tensors: dict[str, Value]) -> dict[str, Value]:
    """Rename the per-expert keys of a state dict to their checkpoint names (saving).

    Args:
        model: the linearized model the tensors come from.
        tensors: in-memory tensor names to tensors (or anything else kept per tensor).

    Returns:
        The same values, per-expert ones under their checkpoint names.
    """
    return _renamed(tensors, expert_checkpoint_names(model))


def to_model_names(model: nn.Module, tensors: dict[str, Value]) -> dict[str, Value]:
    """Rename per-expert keys of a checkpoint to the linearized model's names (loading).

    Args:
        model: the linearized model the tensors are loaded into.
        tensors: checkpoint tensor names to tensors (or the files holding them, ...).

    Returns:
        The same values, per-expert ones under the model's names.
    """
    names = expert_checkpoint_names(model)
    return _renamed(tensors, {stored: name for name, stored in names.items()})


def _renamed(tensors: dict[str, Value], layers: dict[str, str]) -> dict[str, Value]:
    moved = {old: new for old, new in layers.items() if old != new}
    if not moved:
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        layer, _, leaf = key.rpartition(".")
        renamed[f"{moved[layer]}.{leaf}" if layer in moved else key] = tensor
    return renamed


def _conversion_rules(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The plain renamings of the model's mapping, and its per-expert projection names."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    config = getattr(model, "config", None)
    if config is None:
        return [], {}
    conversions = extract_weight_conversions_for_model(model) or []
    renamings = []
    projections: dict[str, str] = {}
    for conversion in conversions:
        sources = conversion._original_source_patterns
        targets = conversion._original_target_patterns
        if isinstance(conversion, WeightConverter) and len(targets) == 1:
            fused = targets[0].rpartition(".")[2]
            layers = _PROJECTIONS.get(fused, ())
            stored = [_expert_leaf(source) for source in sources]
            if ".experts" in targets[0] and len(layers) == len(stored) and all(stored):
                projections.update(zip(layers, stored, strict=True))
        elif (
            isinstance(conversion, WeightRenaming)
            and len(sources) == len(targets) == 1
            and _PLAIN.match(sources[0])
            and _PLAIN.match(targets[0])
        ):
            renamings.append((sources[0], targets[0]))
    if "up_proj" in projections and "gate_proj" not in projections:
        projections = {}  # a gated mapping is needed for the gated layers we hold
    return renamings, projections


def _expert_leaf(source: str) -> str | None:
    """``w1`` of ``.experts.*.w1.weight``; None for patterns of another shape."""
    match = re.fullmatch(r".*experts\.\*\.(\w+)\.weight", source)
    return match.group(1) if match else None


def _checkpoint_path(path: str, renamings: list[tuple[str, str]]) -> str | None:
    """The checkpoint path whose renamings give ``path``; None when they do not."""
    stored = path
    for source, target in reversed(renamings):
        plain_source, plain_target = source.replace("\\", ""), target.replace("\\", "")
        stored = stored.replace(plain_target, plain_source)
    forward = stored
    for source, target in renamings:
        forward = re.sub(source, target.replace("\\", ""), forward)
    return stored if forward == path else None

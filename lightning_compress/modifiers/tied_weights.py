"""Untying weights that a targeted layer shares with another module (tied word embeddings).

A language model with ``tie_word_embeddings`` holds one matrix as both ``lm_head.weight`` and
the input embedding's weight. Compressing ``lm_head`` in place would change the embedding too,
and the checkpoint written afterwards would no longer load. A modifier about to change a
layer's weight first gives the layer its own copy (the model computes the same function) and
records on a transformers model that its embeddings are now untied, so it saves and loads as
such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loguru import logger
from torch import nn

from lightning_compress.recipe.errors import RecipeError

__all__ = ["untie_weights"]


def untie_weights(
    owner: str, model: nn.Module, layers: Mapping[str, nn.Module], optimizer: Any = None
) -> list[str]:
    """Gives every layer of ``layers`` whose weight another module shares its own copy.

    Each untied layer is named in a warning. A transformers model (or submodel) holding it
    loses the layer from its ``all_tied_weights_keys`` and, when no other tie is left, gets
    ``config.tie_word_embeddings = False``, so ``save_compressed`` writes both weights and
    ``from_pretrained`` loads them apart.

    Args:
        owner: the modifier's class name.
        model: the whole model (the other holders of a weight may lie outside ``layers``).
        layers: the layers the modifier will change, by name in ``model``.
        optimizer: an optimizer (or several) already built for ``model``, if any.

    Returns:
        The names of the layers untied.

    Raises:
        RecipeError: when ``optimizer`` already holds a shared weight (a copy made now would
            not be trained); nothing is changed then.
    """
    holders = _holders(model)
    shared = {
        name: [other for other in holders.get(id(module.weight), []) if other != name]
        for name, module in layers.items()
        if isinstance(module._parameters.get("weight"), nn.Parameter)
    }
    shared = {name: others for name, others in shared.items() if others}
    trained = _optimized(optimizer)
    for name, others in shared.items():
        if id(layers[name].weight) in trained:
            raise RecipeError(
                f"{owner}: layer '{name}' shares its weight with {others} (tied embeddings) "
                "and the optimizer already holds it; expected the weights untied before the "
                f"optimizer is built, or '{name}' in {owner}.ignore"
            )
    for name, others in shared.items():
        module = layers[name]
        weight = module.weight
        module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        _record_untied(model, name)
        logger.warning(
            "{}: layer '{}' shares its weight with {} (tied embeddings); it now has its own "
            "copy, so compressing it leaves {} unchanged and the model is saved with untied "
            "embeddings (tie_word_embeddings=False). Add '{}' to ignore to keep them tied.",
            owner,
            name,
            others,
            others,
            name,
        )
    return list(shared)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """The names of the modules holding each parameter directly, by the parameter's id."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(name)
    return holders


def _optimized(optimizer: Any) -> set[int]:
    """The ids of the parameters ``optimizer`` (one, several, or None) updates."""
    if optimizer is None:
        optimizers: Iterable[Any] = []
    else:
        optimizers = optimizer if isinstance(optimizer, list | tuple) else [optimizer]
    return {
        id(param)
        for opt in optimizers
        for group in getattr(opt, "param_groups", [])
        for param in group["params"]
    }


def _record_untied(model: nn.Module, name: str) -> None:
    """Marks the transformers models holding layer ``name`` as having untied embeddings."""
    for prefix, module in model.named_modules():
        if prefix and not name.startswith(f"{prefix}."):
            continue
        tied = getattr(module, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            weight = f"{name[len(prefix) + 1 :] if prefix else name}.weight"
            # the layer may be the tie's target (lm_head) or its source (the input embedding)
            for key in [key for key, source in tied.items() if weight in (key, source)]:
                del tied[key]
        config = getattr(module, "config", None)
        # other ties the flag governs (an encoder's embedding) must stay tied when loaded
        if getattr(config, "tie_word_embeddings", False) and not tied:
            config.tie_word_embeddings = False

"""Which models can be exported, and the ``config.json`` each is described by.

Hugging Face ``PreTrainedModel`` s keep their own config. Any other model exports when it
describes itself: a ``pretrained_config()`` method returns the transformers config (with
``architectures``) of the model it computes exactly, with the same module names. The bundled
:class:`~lightning_compress.bundled.TinyDecoder` does so as a ``LlamaForCausalLM``, which
transformers and vLLM load as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = ["checkpoint_config", "find_exportable", "is_exportable"]


def is_exportable(module: nn.Module) -> bool:
    """Whether ``save_compressed`` can write ``module``.

    Args:
        module: a model.

    Returns:
        True for a transformers ``PreTrainedModel`` and for a model with a
        ``pretrained_config()`` method.
    """
    return isinstance(module, PreTrainedModel) or callable(
        getattr(module, "pretrained_config", None)
    )


def find_exportable(module: nn.Module) -> nn.Module:
    """The model to export inside ``module`` (e.g. a LightningModule holding it).

    Args:
        module: an exportable model, or a module holding exactly one (outermost) exportable
            model among its submodules.

    Returns:
        ``module`` itself, or the exportable model it holds.

    Raises:
        TypeError: when ``module`` holds no exportable model, or several.
    """
    if is_exportable(module):
        return module
    found = _outermost_exportable(module)
    if len(found) != 1:
        names = [name for name, _ in found]
        raise TypeError(
            f"{type(module).__name__} holds {len(found)} exportable models {names}; expected "
            "exactly one transformers PreTrainedModel or model with pretrained_config() to save "
            "(pass that model itself)"
        )
    return found[0][1]


def _outermost_exportable(module: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if is_exportable(child):
            found.append((name, child))
        else:
            inside = _outermost_exportable(child)
            found.extend((f"{name}.{inner}", model) for inner, model in inside)
    return found


def checkpoint_config(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` content of ``model``'s checkpoint, without ``quantization_config``.

    Args:
        model: a transformers ``PreTrainedModel``, or a model with a ``pretrained_config()``
            method.

    Returns:
        The config, with ``architectures`` and the dtype of the model's weights.

    Raises:
        TypeError: for any other model.
    """
    if isinstance(model, PreTrainedModel):
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
    elif callable(getattr(model, "pretrained_config", None)):
        config = model.pretrained_config().to_dict()
        if not config.get("architectures"):
            raise TypeError(
                f"save_compressed: {type(model).__name__}.pretrained_config() names no "
                "architectures; expected the transformers class that computes the model"
            )
    else:
        raise TypeError(
            f"save_compressed: expected a transformers PreTrainedModel or a model with "
            f"pretrained_config(), got {type(model).__name__}"
        )
    config.pop("quantization_config", None)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = _dtype_name(model)
    return config


def _dtype_name(model: nn.Module) -> str:
    dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )
    return str(dtype).removeprefix("torch.")

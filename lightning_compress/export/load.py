"""``load_compressed``: read a compressed-tensors checkpoint back as a model to run or train."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from compressed_tensors.utils.match import match_named_modules, match_targets
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lightning_compress.export.attention import (
    AttentionState,
    is_attention_group,
    restore_attention,
    take_attention_scales,
)
from lightning_compress.export.errors import ExportError
from lightning_compress.export.readback import decompress_layer
from lightning_compress.export.reader import read_json, read_tensors
from lightning_compress.export.save import CONFIG_NAME
from lightning_compress.export.schemes import from_ct_scheme
from lightning_compress.export.staging import recover_checkpoint
from lightning_compress.export.validation import check_layer, check_state, read_quantization_config
from lightning_compress.layers import linearize
from lightning_compress.layers.conv1d import conv1d_orientation
from lightning_compress.layers.expert_names import to_model_names
from lightning_compress.modifiers.quantization import QuantizationScheme, attach_quantization
from lightning_compress.modifiers.quantization.ops import quantized_dtype
from lightning_compress.modifiers.quantization.runtime import QPARAM_BUFFERS

__all__ = ["load_compressed"]

LAYER_TENSORS = ("weight", "bias")


def load_compressed(path: str | os.PathLike, keep_quantization: bool = True) -> PreTrainedModel:
    """Loads a compressed-tensors checkpoint (or a plain one) as a causal LM of transformers.

    Each quantized layer is read with compressed-tensors' own decompressor, under the scheme
    of the config group compressed-tensors matches it to. With ``keep_quantization`` the layer
    then holds what this project's quantization leaves (its quantized weight, the
    ``weight_scale`` / ``weight_zero_point`` / ``input_scale`` buffers, ``quantization_scheme``
    and the input quantizer), so the model computes the logits of the model that was saved,
    activation quantization included, and ``save_compressed`` writes it back unchanged.
    Without it the model is dense, holding the dequantized weights: the start for a new
    recipe (quantization-aware training, another scheme). Pruned weights stay zero either
    way; a ``ConstantPruningModifier`` keeps them so while fine-tuning.

    KV-cache scales (``kv_cache_scheme``, and attention groups quantizing queries) come back
    as the attention modules' ``k_scale`` / ``v_scale`` / ``q_scale`` buffers with their
    ``attention_scheme`` (run them with
    :func:`~lightning_compress.modifiers.quantization.kv_cache.quantized_attention`).

    The model's layers are linearized as for compressing (see
    :func:`~lightning_compress.layers.linearize`): GPT-2's ``Conv1D`` layers come back as
    ``nn.Linear`` layers, which transformers cannot build quantized.

    Args:
        path: the checkpoint directory (``config.json`` and safetensors files).
        keep_quantization: restore each quantized layer's quantization (True), or return
            the dequantized dense model (False).

    Returns:
        The model, in eval mode, in the checkpoint's dtype.

    Before anything is loaded, every quantized layer's stored tensors are checked against
    its config group (names, shapes and dtypes of what compressed-tensors writes for the
    scheme and format, ``weight_shape``, the range of unpacked codes), each group's format
    against its scheme (a W8A8 group whose ``input_activations`` was dropped is refused, not
    loaded as weight-only int8), and every other tensor against the model's. What an interrupted
    ``save_compressed`` of ``path`` left beside it is finished first.

    Raises:
        ExportError: naming the file, and the layer or field, when ``config.json`` or a
            safetensors file is unreadable (corrupt, truncated, missing), the
            ``quantization_config`` is not a valid compressed-tensors config or does not
            describe the stored tensors, a config group targets layers other than
            ``nn.Linear`` (or a weight-only ``nn.Embedding``) or uses a scheme this project
            cannot run, or the checkpoint's tensors do not fit the model.
        FileNotFoundError: when ``path`` holds no ``config.json``.
    """
    path = Path(path)
    recover_checkpoint(path)
    config_dict = read_json(path / CONFIG_NAME)
    config = read_quantization_config(config_dict, path / CONFIG_NAME)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict))
    linearize(model)
    tensors, files = read_tensors(path)
    tensors = conv1d_orientation(model, to_model_names(model, tensors))
    files = to_model_names(model, files)
    quantized: dict[str, tuple[nn.Module, CTQuantizationScheme, dict[str, Tensor]]] = {}
    attention: AttentionState = {}
    if config is not None:
        attention = take_attention_scales(model, config, tensors, str(path))
        for name, module, scheme in _assigned_schemes(model, config):
            prefix = f"{name}."
            keys = _local_keys(tensors, prefix)
            stored = {key[len(prefix) :]: tensors.pop(key) for key in keys}
            origin = ", ".join(sorted({str(files[key]) for key in keys})) or str(path)
            check_layer(name, module, scheme, stored, origin)
            layer = decompress_layer(stored, scheme)
            tensors.update({prefix + key: layer[key] for key in LAYER_TENSORS if key in layer})
            qparams = {key: layer[key] for key in QPARAM_BUFFERS if key in layer}
            quantized[name] = (module, scheme, qparams)
    _load_state(model, tensors, files)
    if keep_quantization:
        for module, scheme, qparams in quantized.values():
            _restore_quantization(module, from_ct_scheme(scheme), qparams)
        restore_attention(attention)
    return model.eval()


def _assigned_schemes(
    model: nn.Module, config: QuantizationConfig
) -> list[tuple[str, nn.Module, CTQuantizationScheme]]:
    """Each layer a config group covers, with its scheme, matched as compressed-tensors does."""
    target_to_scheme: OrderedDict[str, CTQuantizationScheme] = OrderedDict()
    for scheme in config.config_groups.values():
        if is_attention_group(scheme):  # attention modules: take_attention_scales
            continue
        stored_as = scheme.format or config.format
        for target in scheme.targets:
            target_to_scheme[target] = scheme.model_copy(update={"format": stored_as})
    assigned = []
    for name, module in match_named_modules(model, target_to_scheme, config.ignore):
        # The most specific target wins: exact name, then regex, then class name.
        scheme = target_to_scheme[match_targets(name, module, target_to_scheme)[0]]
        weights_only = scheme.input_activations is None and scheme.output_activations is None
        if not (isinstance(module, nn.Linear) or isinstance(module, nn.Embedding) and weights_only):
            raise ExportError(
                f"the checkpoint quantizes '{name}', a {type(module).__name__}; lightning_"
                "compress runs quantized Linear layers and weight-only quantized Embedding "
                "layers only"
            )
        assigned.append((name, module, scheme))
    return assigned


def _local_keys(tensors: dict[str, Tensor], prefix: str) -> list[str]:
    return [key for key in tensors if key.startswith(prefix) and "." not in key[len(prefix) :]]


def _load_state(model: nn.Module, tensors: dict[str, Tensor], files: dict[str, Path]) -> None:
    """Loads ``tensors``; only tensors tied to loaded ones (tied embeddings) may be missing."""
    state = model.state_dict()
    check_state(tensors, state, files)
    unexpected = sorted(key for key in tensors if key not in state)
    loaded = {state[key].data_ptr() for key in tensors if key in state}
    untied = [key for key in state if key not in tensors and state[key].data_ptr() not in loaded]
    if unexpected or untied:
        culprits = sorted({str(files[key]) for key in unexpected} or set(map(str, files.values())))
        raise ExportError(
            f"{', '.join(culprits)}: the checkpoint does not fit {type(model).__name__}: "
            f"missing {untied}, unexpected {unexpected}"
        )
    model.load_state_dict(tensors, strict=False)


def _restore_quantization(
    module: nn.Module, scheme: QuantizationScheme, stored: dict[str, Tensor]
) -> None:
    """Gives ``module`` its qparam buffers (zero points of symmetric schemes are 0, global
    scales where stored) and scheme."""
    for role, args in (("weight", scheme.weights), ("input", scheme.input_activations)):
        scale = stored.get(f"{role}_scale")
        if args is None or scale is None:
            continue
        zero_point = stored.get(f"{role}_zero_point")
        if zero_point is None:
            zero_point = torch.zeros(scale.shape, dtype=quantized_dtype(args))
        module.register_buffer(f"{role}_scale", scale.to(module.weight.device))
        module.register_buffer(
            f"{role}_zero_point", zero_point.to(module.weight.device, quantized_dtype(args))
        )
        global_scale = stored.get(f"{role}_global_scale")
        if global_scale is not None:  # strategy tensor_group (NVFP4)
            module.register_buffer(f"{role}_global_scale", global_scale.to(module.weight.device))
    input_global_scale = stored.get("input_global_scale")
    if "input_scale" not in stored and input_global_scale is not None:  # dynamic: local
        module.register_buffer("input_global_scale", input_global_scale.to(module.weight.device))
    attach_quantization(module, scheme)

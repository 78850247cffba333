"""``save_compressed``: write a compressed model as a compressed-tensors checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loguru import logger
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_compress.core.compression_record import RECORD_ATTRIBUTE, partial_compression
from lightning_compress.export.errors import ExportError
from lightning_compress.export.expert_readback import misread_expert_formats
from lightning_compress.export.models import checkpoint_config, find_exportable
from lightning_compress.export.quantization_config import quantization_config
from lightning_compress.export.schemes import check_finished, quantized_layers
from lightning_compress.export.sparsity import sparsity_record, write_record
from lightning_compress.export.staging import recover_checkpoint, staged_directory
from lightning_compress.export.tensors import compressed_state_dict
from lightning_compress.export.tokenizer import save_tokenizer
from lightning_compress.export.writer import DEFAULT_MAX_SHARD_BYTES, check_output_dir, write_shards
from lightning_compress.layers.conv1d import conv1d_orientation
from lightning_compress.layers.expert_names import to_checkpoint_names
from lightning_compress.recipe import Recipe, RecipeInput

__all__ = [
    "CONFIG_NAME",
    "RECIPE_NAME",
    "check_local",
    "refuse_partly_compressed",
    "save_compressed",
    "write_metadata",
]

CONFIG_NAME = "config.json"
RECIPE_NAME = "recipe.yaml"


def save_compressed(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any | None = None,
    recipe: RecipeInput | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    pack_asymmetric: bool = False,
    progress: bool = True,
) -> Path:
    """Saves a compressed model in the compressed-tensors format transformers and vLLM load.

    The directory gets safetensors shards in which every quantized layer is packed by
    compressed-tensors (``pack-quantized`` for int4 weights, ``int-quantized`` for W8A8,
    ``float-quantized`` for FP8, ...), ``config.json`` with a ``quantization_config``
    (``quant_method: compressed-tensors``, one config group per distinct scheme, ``ignore``
    for unquantized linear layers and an empty ``sparsity_config``, which is what vLLM loads),
    the model's ``generation_config.json``, the tokenizer's files, ``recipe.yaml`` and, when
    linear layers are pruned, ``sparsity.json`` (the sparsity reached, global and per layer,
    and its structure, ``2:4`` or unstructured; pruned weights are stored dense, their zeros
    kept). ``AutoModelForCausalLM.from_pretrained(output_dir)`` then gives the
    logits of the model in memory: each layer is checked to read back as it is and in the
    layout the installed transformers prepares to load. Layers with asymmetric int weights
    in groups or channels are stored ``naive-quantized`` (one int8 code per weight), with a
    warning, where the installed compressed-tensors cannot load its own ``pack-quantized``
    zero points (see :data:`~lightning_compress.export.schemes.FALLBACK_FORMAT`); vLLM
    serves int4 from ``pack-quantized`` only, which ``pack_asymmetric=True`` writes.

    Layers that were transformers' ``Conv1D`` (GPT-2) keep its orientation of ``.weight``
    (``[in, out]``, which transformers and vLLM's GPT-2 read); their packed weights and
    qparams are in ``nn.Linear`` layout, as compressed-tensors and vLLM expect.

    Mixture-of-experts layers (linearized experts) are saved per expert under the names
    transformers' conversion mapping fuses on loading (``lightning_compress.layers.expert_names``:
    Mixtral ``block_sparse_moe.experts.<e>.w1/w3/w2``, Qwen-MoE, DeepSeek-V3 and OLMoE
    ``mlp.experts.<e>.gate_proj/up_proj/down_proj``), which transformers 5 dequantizes while
    merging them into its fused experts.

    A model that is not quantized (never compressed, or only pruned) is saved plainly (no
    ``quantization_config``), as compressed-tensors saves it.
    The bundled ``TinyDecoder`` is saved as the ``LlamaForCausalLM`` it equals.

    Everything is written into a hidden sibling directory, fsynced, and renamed to
    ``output_dir`` at the end: after an error, ``output_dir`` is either complete or as it was.
    What a crashed save left beside ``output_dir`` is finished or removed by the next save
    (or ``load_compressed``) of it, so a crash during an overwrite never leaves the path
    without a checkpoint.

    Args:
        model: a transformers ``PreTrainedModel`` or ``TinyDecoder`` (or a module, such as a
            LightningModule, holding exactly one), compressed and finalized.
        output_dir: the checkpoint directory.
        tokenizer: a transformers tokenizer or the bundled ``ByteTokenizer``, saved alongside.
        recipe: the recipe that compressed the model (anything ``Recipe.create_instance``
            reads: YAML text, a path, modifiers, a ``Recipe``), saved as ``recipe.yaml``.
        overwrite: replace ``output_dir`` if it exists and is not empty.
        max_shard_bytes: the largest safetensors file.
        pack_asymmetric: store asymmetric int weights ``pack-quantized`` (what vLLM and
            ``load_compressed`` read) even where the installed transformers cannot load it.
        progress: show a progress bar over the tensors being packed and checked (on stderr,
            when it is a terminal).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ExportError: when ``output_dir`` exists, is not empty and ``overwrite`` is false; when
            compression is unfinished (QAT parametrizations, pruning masks, a failed
            calibration that left the model partly compressed); when a layer's
            scheme cannot be expressed in compressed-tensors format, or in a layout the
            installed transformers loads (the message names the layer and the scheme); when
            a weight left its quantization grid; or for sharded (``DTensor``) weights.
        TypeError: for a model that is not exportable, or an unsupported tokenizer.
    """
    refuse_partly_compressed(model)
    recover_checkpoint(output_dir)
    path = check_output_dir(output_dir, overwrite)
    model = find_exportable(model)
    refuse_partly_compressed(model)
    config = checkpoint_config(model)
    check_local(model.state_dict())
    check_finished(model)
    layers = quantized_layers(model, pack_asymmetric)
    state = compressed_state_dict(model, layers, progress)
    misread_expert_formats(model, layers, state.tensors)
    qconfig = quantization_config(model, layers)
    sparsity = sparsity_record(model, state.zeros)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    tensors = to_checkpoint_names(model, conv1d_orientation(model, state.tensors))
    recipe_text = None if recipe is None else Recipe.create_instance(recipe).yaml()
    with staged_directory(path, overwrite) as staging:
        write_shards(tensors, staging, max_shard_bytes)
        write_metadata(staging, model, config, tokenizer, recipe_text, sparsity)
    logger.info(
        "saved {} ({} quantized layers, format {}) to {}",
        type(model).__name__,
        len(layers),
        (qconfig or {}).get("format", "dense"),
        path,
    )
    return path


def write_metadata(
    directory: Path,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: Any | None,
    recipe_text: str | None,
    sparsity: dict[str, Any] | None,
) -> None:
    """Writes everything of a checkpoint but its tensors.

    Args:
        directory: the checkpoint directory being written.
        model: the exportable model (its ``generation_config`` is saved; its weights are
            not read).
        config: the ``config.json`` content, with its ``quantization_config``.
        tokenizer: a tokenizer to save alongside, or None.
        recipe_text: the recipe's YAML, or None.
        sparsity: the sparsity record, or None when nothing is pruned.

    Raises:
        TypeError: for an unsupported tokenizer.
    """
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    if recipe_text is not None:
        (directory / RECIPE_NAME).write_text(recipe_text)
    if sparsity is not None:
        write_record(sparsity, directory)


def check_local(state: Mapping[str, Tensor]) -> None:
    """Refuses sharded (``DTensor``) tensors, which a checkpoint cannot hold.

    Args:
        state: tensor names to tensors about to be saved.

    Raises:
        ExportError: naming one, when some are ``DTensor`` s.
    """
    sharded = [name for name, tensor in state.items() if isinstance(tensor, DTensor)]
    if sharded:
        raise ExportError(
            f"{len(sharded)} tensors (e.g. '{sharded[0]}') are sharded DTensors; gather the "
            "full model on one process (e.g. load it from a full checkpoint) before saving"
        )


def refuse_partly_compressed(model: nn.Module) -> None:
    """Refuses a model a failed calibration left partly compressed.

    Args:
        model: the model about to be saved.

    Raises:
        ExportError: describing the failure, when the model carries its record.
    """
    record = partial_compression(model)
    if record is not None:
        raise ExportError(
            f"refusing to save {type(model).__name__}: a failed calibration left it partly "
            f"compressed ({record.describe()}); the checkpoint would mix compressed and "
            f"uncompressed blocks. Compress the original model again (the record is "
            f"model.{RECORD_ATTRIBUTE})"
        )

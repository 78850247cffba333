"""``model_free_compress``: a data-free recipe applied to a checkpoint directory, shard by
shard, without building the model in memory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from loguru import logger

from lightning_compress.core.checkpoint_files import CONFIG_NAME
from lightning_compress.core.progress import progress_bar
from lightning_compress.export.model_free.plan import plan_layers, plan_tasks
from lightning_compress.export.model_free.pool import run_all
from lightning_compress.export.model_free.source import read_checkpoint
from lightning_compress.export.model_free.worker import run_task
from lightning_compress.export.models import checkpoint_config
from lightning_compress.export.quantization_config import quantization_config
from lightning_compress.export.staging import recover_checkpoint, staged_directory
from lightning_compress.export.writer import INDEX_NAME, SINGLE_SHARD_NAME, check_output_dir
from lightning_compress.recipe import Recipe, RecipeError, RecipeInput

__all__ = ["DEFAULT_TASK_BYTES", "model_free_compress"]

DEFAULT_TASK_BYTES = 256 * 2**20
RECIPE_NAME = "recipe.yaml"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def model_free_compress(
    model_dir: str | os.PathLike,
    recipe: RecipeInput,
    output_dir: str | os.PathLike,
    workers: int = 1,
    overwrite: bool = False,
    task_bytes: int = DEFAULT_TASK_BYTES,
    pack_asymmetric: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Quantizes a checkpoint directory with a data-free recipe, shard by shard, into a
    compressed-tensors checkpoint, never holding the model in memory.

    The recipe's ``QuantizationModifier`` targets are resolved on the model built from the
    checkpoint's ``config.json`` on the meta device (no memory), exactly as ``oneshot``
    resolves them (``Linear`` means the ``nn.Linear`` layers of that model, regex targets
    match its module names, ``ignore`` applies). Each targeted weight is then read from the
    safetensors files (memory-mapped), rounded to nearest with the numerics of the in-memory
    one-shot path (NVFP4's fused q/k/v and gate/up layers share one global scale there too),
    packed as ``save_compressed`` packs it and checked to read back; every other tensor is
    copied unchanged. The output holds the same tensors, ``config.json`` (with the same
    ``quantization_config``), ``generation_config.json``, tokenizer files and ``recipe.yaml``
    as ``oneshot(...)`` followed by ``save_compressed`` on the model loaded in the checkpoint's
    dtype; its shards are split by task, with an index. It is written aside and renamed into
    place at the end (as ``save_compressed``), so ``output_dir`` is complete or as it was.

    The work is split into tasks of about ``task_bytes`` read; with ``workers > 1`` that many
    spawned processes run them, so memory is about one task (its output and the largest
    tensor being quantized, in float32) per worker, whatever the model's size.

    Data-free means: one-shot ``QuantizationModifier`` s whose schemes quantize weights only
    or activations dynamically (W4A16, W8A16, FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4A16,
    ...). Any other modifier, static activations or a KV-cache scheme are refused, naming
    the modifier.

    Args:
        model_dir: a local transformers-format checkpoint: ``config.json`` and safetensors
            files (``model.safetensors``, or shards with ``model.safetensors.index.json``).
        recipe: the recipe (anything ``Recipe.create_instance`` reads).
        output_dir: the compressed checkpoint's directory.
        workers: how many processes quantize at once (1: this process).
        overwrite: replace ``output_dir`` if it exists and is not empty.
        task_bytes: about how many bytes of the checkpoint one task reads (a larger tensor,
            or a set of NVFP4 layers sharing a global scale, is one task).
        pack_asymmetric: as :func:`~lightning_compress.export.save_compressed`.
        trust_remote_code: let transformers run the checkpoint's own modelling code to build
            the model on the meta device.
        progress: show a progress bar over the tasks (on stderr, when it is a terminal).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ExportError: naming what is missing from ``model_dir`` (the directory, its config, its
            safetensors files), a tensor whose shape does not match the config or that a
            quantized layer needs and the checkpoint lacks, an architecture transformers cannot
            build, a module the model-free path cannot quantize (``Conv1D``, fused experts), a
            layer whose weight is not finite, or an ``output_dir`` that exists and is not empty.
        RecipeError: naming a modifier that is not data-free one-shot quantization, or when
            the recipe quantizes no layer.
        ValueError: when ``workers`` or ``task_bytes`` is not a positive int.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    source = read_checkpoint(model_dir)
    recipe = Recipe.create_instance(recipe)
    recover_checkpoint(output_dir)
    path = check_output_dir(output_dir, overwrite)
    model = source.meta_model(trust_remote_code)
    layers = plan_layers(recipe, model, source, pack_asymmetric)
    if not layers:
        raise RecipeError(
            f"the recipe quantizes no layer of {type(model).__name__} in {str(source.path)!r}; "
            "expected targets that match its linear layers (e.g. targets: Linear)"
        )
    tasks = plan_tasks(layers, source, task_bytes)
    config = checkpoint_config(model)
    ct_layers = {name: (model.get_submodule(name), plan.ct_scheme) for name, plan in layers.items()}
    config["quantization_config"] = quantization_config(model, ct_layers)
    names = _shard_names(len(tasks))
    with staged_directory(path, overwrite) as staging:
        calls = [
            (source.files, task, staging / name) for task, name in zip(tasks, names, strict=True)
        ]
        weight_map = {}
        finished = run_all(run_task, calls, workers)
        for index, written in progress_bar(finished, "Compressing shards", len(calls), progress):
            weight_map.update(dict.fromkeys(written, names[index]))
        if len(names) > 1:
            _write_index(staging, weight_map)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(source.path, staging, model)
        (staging / RECIPE_NAME).write_text(recipe.yaml())
    logger.info(
        "compressed {} layers of {} model-free ({} tasks, {} workers) to {}",
        len(layers),
        type(model).__name__,
        len(tasks),
        workers,
        path,
    )
    return path


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_SHARD_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(directory: Path, weight_map: dict[str, str]) -> None:
    total = sum((directory / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(source: Path, directory: Path, model: object) -> None:
    """Copies the generation config (or writes the model's) and the tokenizer's files."""
    if (source / GENERATION_CONFIG_NAME).is_file():
        shutil.copyfile(source / GENERATION_CONFIG_NAME, directory / GENERATION_CONFIG_NAME)
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, directory / name)
    if not copied:
        logger.warning(
            "{} holds no tokenizer files ({}): the compressed checkpoint has none either",
            source,
            ", ".join(TOKENIZER_FILES[:2]),
        )

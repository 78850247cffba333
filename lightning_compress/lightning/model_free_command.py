"""``lightning-compress compress --model_free``: a data-free recipe applied to a checkpoint
directory shard by shard (:func:`~lightning_compress.export.model_free_compress`)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lightning_compress.cli_options import add_flag
from lightning_compress.export import model_free_compress
from lightning_compress.recipe import Recipe

__all__ = ["add_model_free_options", "run_model_free"]

IGNORED_BY_MODEL_FREE = ("dataset", "eval_dataset", "dtype", "tokenizer")


def add_model_free_options(parser: ArgumentParser) -> None:
    """Adds ``--model_free`` and ``--workers`` to the ``compress`` parser.

    Args:
        parser: the parser.
    """
    add_flag(
        parser,
        "--model_free",
        "quantize --model (a checkpoint directory) shard by shard without loading it: "
        "data-free recipes only (weight-only RTN, FP8_DYNAMIC, FP8 block, NVFP4A16/MX weights); "
        "memory stays about one tensor per worker",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="--model_free: processes quantizing at once"
    )


def run_model_free(parser: ArgumentParser, config: Namespace) -> Path:
    """Runs the model-free path for a parsed ``compress`` command.

    Args:
        parser: the ``compress`` parser, for usage errors.
        config: its parsed arguments.

    Returns:
        The written checkpoint directory.
    """
    if not isinstance(config.model, str) or not Path(config.model).is_dir():
        parser.error(f"--model_free: --model must be a checkpoint directory, got {config.model!r}")
    if config.output_dir is None:
        parser.error("--model_free: --output_dir is required (the compressed checkpoint)")
    given = [f"--{name}" for name in IGNORED_BY_MODEL_FREE if config.get(name) is not None]
    if given:
        parser.error(
            f"--model_free reads no data and keeps the checkpoint's dtype and tokenizer: "
            f"{', '.join(given)} cannot be used with it"
        )
    recipe = Recipe.create_instance(
        config.recipe, target_stage=config.recipe_stage, recipe_args=config.recipe_args
    )
    path = model_free_compress(
        config.model,
        recipe,
        config.output_dir,
        workers=config.workers,
        overwrite=config.overwrite_output_dir,
    )
    print(f"Saved the compressed model to {path} (compressed-tensors format, model-free)")
    return path

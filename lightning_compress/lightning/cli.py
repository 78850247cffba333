"""LightningCLI for training with compression: ``lightning-compress {fit,validate,test,predict}``.

One-shot compression from the command line is ``lightning-compress compress``
(``lightning_compress.lightning.compress_command``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_compress.bundled import (
    TinyDecoder,
    bundled_text,
    load_tokenizer,
    token_windows,
)
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.lightning.oneshot import oneshot

__all__ = [
    "LIGHTNING_COMMANDS",
    "CompressionCLI",
    "CompressionTrainer",
    "language_model",
    "run_cli",
]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class CompressionTrainer(pl.Trainer):
    """A Trainer with a ``compress`` method: one-shot compression after ``fit`` in Python."""

    def compress(
        self,
        model: nn.Module,
        datamodule: pl.LightningDataModule | None = None,
        recipe: str | dict[str, Any] | None = None,
        recipe_stage: str | list[str] | None = None,
        recipe_args: dict[str, Any] | None = None,
        num_calibration_samples: int | None = 64,
        max_seq_length: int = 256,
        batch_size: int = 1,
        pipeline: str = "auto",
        sequential_targets: list[str] | None = None,
        device: str | None = None,
        offload_dir: str | None = None,
        output_dir: str | None = None,
        propagate_compressed: bool = True,
        staged: bool = True,
        moe_calibrate_all_experts: bool = True,
        overwrite_output_dir: bool = False,
    ) -> nn.Module:
        """Compress a model after training with a recipe (one-shot, calibrated).

        Args:
            model: the model, or a ``CausalLMModule`` whose language model is compressed.
            datamodule: calibration data from its ``train_dataloader``; None: windows of
                ``max_seq_length`` tokens of the bundled calibration text.
            recipe: a recipe path, YAML text, or the recipe as a mapping.
            recipe_stage: the stage or stages to run.
            recipe_args: values for the recipe's ``${args.name}`` interpolations.
            num_calibration_samples: calibration samples; None takes all the data.
            max_seq_length: tokens per calibration sample.
            batch_size: samples per calibration batch.
            pipeline: ``auto``, ``sequential``, ``basic`` or ``data_free``.
            sequential_targets: class names of the blocks for the sequential pipeline.
            device: where blocks run; None: this Trainer's device.
            offload_dir: spill the activation cache to this directory.
            output_dir: save the compressed model here, as a compressed-tensors checkpoint
                that transformers and vLLM load (the bundled model as a Llama checkpoint,
                with its tokenizer).
            propagate_compressed: feed each block the compressed previous block's outputs.
            staged: calibrate blocks in one forward that compresses each group of layers
                when every batch reaches it (see ``PipelineOptions``).
            moe_calibrate_all_experts: calibrate every expert of a mixture on every token
                (False: on the tokens routed to it; see ``PipelineOptions``).
            overwrite_output_dir: replace ``output_dir`` if it exists and is not empty.

        Returns:
            The compressed language model.

        Raises:
            ValueError: without a recipe.
        """
        if recipe is None:
            raise ValueError("compress needs a recipe: set 'recipe' in the config")
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
            data = datamodule.train_dataloader()
        else:
            data = token_windows(
                bundled_text("calibration"),
                load_tokenizer(),
                max_seq_length,
                num_calibration_samples,
            )
        model = language_model(model)
        return oneshot(
            model,
            recipe,
            data,
            num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length,
            output_dir=output_dir,
            pipeline=pipeline,
            sequential_targets=sequential_targets,
            batch_size=batch_size,
            device=device,
            offload_dir=offload_dir,
            recipe_stage=recipe_stage,
            recipe_args=recipe_args,
            propagate_compressed=propagate_compressed,
            staged=staged,
            moe_calibrate_all_experts=moe_calibrate_all_experts,
            trainer=self,
            tokenizer=load_tokenizer() if isinstance(model, TinyDecoder) else None,
            overwrite_output_dir=overwrite_output_dir,
        )


class CompressionCLI(LightningCLI):
    """LightningCLI whose model defaults to ``CausalLMModule`` (the bundled LM)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        class_path = f"{CausalLMModule.__module__}.{CausalLMModule.__qualname__}"
        parser.set_defaults({"model": {"class_path": class_path}})


def language_model(model: nn.Module) -> nn.Module:
    """The language model a CLI model holds: a ``CausalLMModule``'s ``model``, else itself.

    Args:
        model: the CLI's model.

    Returns:
        The module to compress.
    """
    return model.model if isinstance(model, CausalLMModule) else model


def run_cli(args: list[str] | None = None) -> LightningCLI:
    """Run the LightningCLI; the model defaults to the bundled LM.

    ``fit``/``validate``/``test``/``predict`` train and evaluate (add
    ``lightning_compress.Compressor`` under ``trainer.callbacks`` to compress while training).

    Args:
        args: e.g. ``["fit", "--config", "configs/train/gradual_pruning.yaml"]``; None:
            ``sys.argv[1:]``.

    Returns:
        The CLI object (its ``trainer`` and ``model`` hold the results).
    """
    return CompressionCLI(
        CausalLMModule,
        None,  # any LightningDataModule
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=CompressionTrainer,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )

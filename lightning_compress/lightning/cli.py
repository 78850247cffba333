"""LightningCLI for compression: ``lightning-compress fit --config ...``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_compress.lightning.language_model import BundledTextDataModule, CausalLMModule

__all__ = ["run_cli"]


def run_cli(args: list[str] | None = None) -> LightningCLI:
    """Run the LightningCLI; model and data default to the bundled LM and text.

    Add ``lightning_compress.Compressor`` under ``trainer.callbacks`` in the YAML to compress.

    Args:
        args: e.g. ``["fit", "--config", "configs/train/gradual_pruning.yaml"]``.

    Returns:
        The CLI object (its ``trainer`` and ``model`` hold the results).
    """
    return LightningCLI(
        CausalLMModule,
        BundledTextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )

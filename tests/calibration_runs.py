"""Run a CalibrationModule under a Trainer and save every rank's calibrated weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.lightning.calibration import CalibrationModule


class SaveWeights(Callback):
    """Every rank saves the calibrated model's state when validation ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def calibrate_tiny_decoder(
    directory: Path, recipe: Any, config: TinyDecoderConfig, **trainer_kwargs: Any
) -> None:
    """Calibrate a seeded tiny decoder on 8 fixed sequences; ranks write ``rank<N>.pt``."""
    torch.manual_seed(0)
    module = CalibrationModule(TinyDecoder(config).eval(), recipe)
    data = torch.randint(0, config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    run_calibration(directory, module, data, **trainer_kwargs)


def run_calibration(
    directory: Path, module: CalibrationModule, data: torch.Tensor, **trainer_kwargs: Any
) -> None:
    """Calibrate ``module`` on ``data`` (one sequence per batch); ranks write ``rank<N>.pt``
    (``callbacks`` in ``trainer_kwargs`` run besides)."""
    trainer = Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[SaveWeights(directory), *trainer_kwargs.pop("callbacks", [])],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **trainer_kwargs,
    )
    trainer.validate(module, dataloaders=DataLoader(data, batch_size=1), verbose=False)

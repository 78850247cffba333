"""Every LightningCLI training config in configs/train runs as written (for a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_compress import Compressor
from lightning_compress.lightning.cli import run_cli

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_fits(config, tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    compressors = [cb for cb in cli.trainer.callbacks if isinstance(cb, Compressor)]
    assert len(compressors) == 1
    session = compressors[0].session
    assert session.lifecycle.finalized and session.lifecycle.recipe.modifiers
    assert cli.trainer.global_step == 3

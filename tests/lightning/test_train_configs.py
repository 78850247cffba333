"""Every LightningCLI training config in configs/train runs as written (for a few steps) and
saves a checkpoint that transformers loads with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_compress import Compressor
from lightning_compress.lightning.cli import run_cli

# The smollm2_* configs name a hub model: test_smollm2_train_configs.py runs them on a tiny one.
CONFIGS = sorted(
    path
    for path in (Path(__file__).parents[2] / "configs" / "train").glob("*.yaml")
    if not path.name.startswith("smollm2_")
)


def compressor_args(config: Path) -> dict:
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    (compressor,) = [cb for cb in callbacks if cb["class_path"].endswith("Compressor")]
    return compressor["init_args"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_fits_and_saves_a_checkpoint_transformers_loads_with_its_tokenizer(
    config, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # save_dir is relative, as a user runs it from the repository
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

    saved = tmp_path / compressor_args(config)["save_dir"]
    model = AutoModelForCausalLM.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    text = "It is a truth universally acknowledged"
    ids = tokenizer(text, return_tensors="pt").input_ids
    trained = cli.model.eval()
    assert ids[0].tolist() == list(cli.model.tokenizer.encode(text))  # the one trained with
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained(ids), rtol=1e-4, atol=1e-4)

"""The SmolLM2 training configs (GPTQ W4 g64 -> QAD; SparseGPT 2:4 -> masked fine-tuning with
distillation) run as written on a tiny Llama saved to a directory, and their checkpoints reload
in transformers with the trained model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_checkpoints import RECORDS, save_checkpoint
from transformers import AutoModelForCausalLM

from lightning_compress import Compressor
from lightning_compress.lightning.cli import run_cli
from lightning_compress.modifiers import OutputDistillationModifier

CONFIG_DIR = Path(__file__).parents[2] / "configs" / "train"
CONFIGS = sorted(CONFIG_DIR.glob("smollm2_*.yaml"))
STEPS = 2


def test_there_is_a_gptq_qad_and_a_sparsegpt_distillation_config():
    assert [path.name for path in CONFIGS] == [
        "smollm2_gptq_qad.yaml",
        "smollm2_sparsegpt24_distill.yaml",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_runs_on_a_tiny_llama_and_saves_a_checkpoint_with_equal_logits(
    config, tmp_path, monkeypatch
):
    model_dir = save_checkpoint(tmp_path / "tiny-llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(RECORDS * 4))
    monkeypatch.chdir(tmp_path)  # save_dir is relative to where the user runs the command
    cli = run_cli(
        [
            "fit",
            "--config",
            str(config),
            f"--model.init_args.model={model_dir}",
            f"--data.init_args.tokenizer={model_dir}",
            f"--data.init_args.files=[{text}]",
            "--data.init_args.seq_len=32",
            "--data.init_args.val_fraction=0.2",
            f"--trainer.max_steps={STEPS}",
            "--trainer.val_check_interval=1",
            "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == STEPS
    (compressor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Compressor)]
    assert compressor.teacher_model is not None  # distilled from the uncompressed model
    modifiers = compressor.session.lifecycle.recipe.modifiers
    assert any(isinstance(m, OutputDistillationModifier) for m in modifiers)
    assert "val_perplexity" in cli.trainer.callback_metrics

    init_args = yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / init_args["save_dir"]).eval()
    ids = torch.tensor([list(b"It is a truth universally acknowledged")])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, cli.model.eval()(ids), rtol=1e-4, atol=1e-4)
    if "sparsegpt" in config.name:
        for name, module in saved.named_modules():
            if name.endswith("proj"):
                nonzero = (module.weight != 0).reshape(-1, 4).sum(dim=1)
                assert (nonzero <= 2).all(), f"{name} is not 2:4 sparse"

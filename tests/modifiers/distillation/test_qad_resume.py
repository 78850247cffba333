"""Quantization-aware distillation stopped mid-way resumes exactly, teacher included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from qad_runs import STEPS, qad_recipe, quiet_trainer, tiny_lm, token_loader

from lightning_compress import Compressor

SCRIPT = Path(__file__).parents[2] / "qad_runs.py"


def fit(steps: int, out: Path | None = None, resume: Path | None = None) -> dict:
    """Train the tiny LM with QAD for ``steps`` steps; return its final state."""
    module = tiny_lm()
    callbacks = [Compressor(qad_recipe(), teacher="uncompressed", teacher_dtype="bfloat16")]
    if out is not None:
        callbacks.append(ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True))
    trainer = quiet_trainer(
        max_steps=steps, callbacks=callbacks, enable_checkpointing=out is not None
    )
    # One batch per epoch: a resumed epoch replays exactly the data of an uninterrupted run.
    trainer.fit(module, token_loader(batch_size=16), ckpt_path=resume)
    return module.model.state_dict()


def test_a_resumed_run_with_an_uncompressed_teacher_equals_the_uninterrupted_run(tmp_path):
    expected = fit(STEPS)
    fit(3, out=tmp_path)  # its step-3 checkpoint is saved before the run ends
    actual = fit(STEPS, resume=tmp_path / "last.ckpt")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *extra], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_kill_and_resume_with_an_uncompressed_teacher_equals_the_uninterrupted_run(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = run(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run(broken, "--kill-after", "3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (broken / "last.ckpt").exists() and not (broken / "final.pt").exists()
    resumed = run(broken, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(whole / "final.pt", weights_only=True)
    actual = torch.load(broken / "final.pt", weights_only=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

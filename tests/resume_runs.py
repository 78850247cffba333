"""Train a small model with a recipe, saving a checkpoint after every step; optionally die
(SIGKILL) after a step, or resume.

The kill-and-resume tests call :func:`train` in their own process for the uninterrupted and the
resumed runs, and run this file as a script for the run that is killed: ``python
resume_runs.py RECIPE OUT_DIR [--model {regressor,mixtral}] [--kill-after N]``. Every run
writes the final state of the trained model (the regressor, or the mixture-of-experts language
model inside its LightningModule) to ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from helpers import KillAfter  # noqa: E402
from lightning_models import Regressor, regression_loader  # noqa: E402

from lightning_compress import Compressor  # noqa: E402

STEPS = {"regressor": 12, "mixtral": 8}


def _training(model: str) -> tuple[LightningModule, DataLoader, nn.Module]:
    """The LightningModule, its data and the model whose state the test compares.

    One batch per epoch: a resumed epoch replays exactly the data an uninterrupted run sees
    (resuming inside an epoch would need a stateful data loader).
    """
    if model == "regressor":
        regressor = Regressor(optimizer="adam")
        return regressor, regression_loader(batch_size=32), regressor
    from moe_models import tiny_moe, tokens

    from lightning_compress.lightning.language_model import CausalLMModule

    module = CausalLMModule(tiny_moe("mixtral").train(), lr=1e-2)
    return module, DataLoader([tokens(4, 16)], batch_size=None), module.model


def train(
    recipe: str,
    out: Path,
    model: str = "regressor",
    kill_after: int | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, torch.Tensor]:
    """Trains ``model`` under a ``Compressor`` of ``recipe``, checkpointing every step to ``out``.

    The run computes on one thread, so that a run in another process (the killed one) takes
    bit for bit the same steps; the caller's thread count is restored afterwards.

    Args:
        recipe: the recipe's YAML text.
        out: the checkpoint directory (``last.ckpt`` after every step, ``final.pt`` at the end).
        model: a key of :data:`STEPS`.
        kill_after: SIGKILL the process once this many steps are saved.
        resume: continue from ``out/last.ckpt``.
        max_steps: stop after this many steps instead of ``STEPS[model]``.

    Returns:
        The trained model's final state, also saved to ``out/final.pt``.
    """
    checkpoint = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)
    callbacks = [Compressor(recipe), checkpoint]
    if kill_after:
        callbacks.append(KillAfter(kill_after))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps or STEPS[model],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, data, trained = _training(model)
        trainer.fit(module, data, ckpt_path=str(out / "last.ckpt") if resume else None)
    finally:
        torch.set_num_threads(threads)
    state = dict(trained.state_dict())
    torch.save(state, out / "final.pt")
    return state


def killed_run(
    recipe: Path, out: Path, kill_after: int, model: str = "regressor"
) -> subprocess.CompletedProcess:
    """Runs :func:`train` in a new process that SIGKILLs itself after ``kill_after`` steps.

    Args:
        recipe: the recipe's YAML file.
        out: the checkpoint directory.
        kill_after: the number of saved steps after which the process dies.
        model: a key of :data:`STEPS`.

    Returns:
        The finished process (``returncode`` -9 where it was killed as planned).
    """
    command = [sys.executable, __file__, str(recipe), str(out), "--model", model]
    command += ["--kill-after", str(kill_after)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out_dir")
    parser.add_argument("--model", choices=sorted(STEPS), default="regressor")
    parser.add_argument("--kill-after", type=int)
    args = parser.parse_args()
    train(
        Path(args.recipe).read_text(),
        Path(args.out_dir),
        model=args.model,
        kill_after=args.kill_after,
    )


if __name__ == "__main__":
    main()
